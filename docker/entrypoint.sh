#!/usr/bin/env bash
# Trainer image entrypoint: say which backends are active, refuse to start if the image lost one it was built
# with (MOE_EXPECT_BACKENDS, set at build time), then run the command. MOE_DOCTOR=0 skips the check.
set -euo pipefail
if [ "${MOE_DOCTOR:-1}" != "0" ]; then
  # The table goes to stderr so a command's stdout (e.g. JSON) stays clean.
  moe doctor --strict 1>&2
fi
exec "$@"
