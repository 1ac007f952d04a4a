"""Keep credentials out of logs, metrics, saved recipes and checkpoints.

A secret is the value of any environment variable whose name contains TOKEN, KEY, SECRET or PASSWORD (HF_TOKEN,
WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...). Everything the trainer prints or writes as text passes through
`redact` / `redact_tree`, which replace each such value with `REDACTED`, wherever it appears. Redaction goes by the
secret's value, never by a key's name: `model.tokenizer` holds a path, not a token, and blanking it would leave a
run that cannot be re-run from its own recipe.yaml. Values shorter than 8 characters are not treated as secrets:
replacing every "1" or "true" would mangle the output and protect nothing.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
MIN_SECRET_LENGTH = 8


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, longest first (so a secret containing another goes first)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """`text` with every secret value replaced by REDACTED."""
    for value in secret_values(environ):
        text = text.replace(value, REDACTED)
    return text


def redact_tree(obj: Any, environ: dict[str, str] | None = None) -> Any:
    """A copy of nested dicts/lists/strings with every secret value redacted (keys too, should one hold a secret)."""
    if isinstance(obj, dict):
        return {redact_tree(k, environ): redact_tree(v, environ) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v, environ) for v in obj)
    if isinstance(obj, str):
        return redact(obj, environ)
    return obj
