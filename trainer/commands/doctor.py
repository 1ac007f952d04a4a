"""`moe doctor`: print which compute backends are active and fail when a required one is missing.

The trainer image sets MOE_EXPECT_BACKENDS to the backends it was built with and its entrypoint runs
`moe doctor --require "$MOE_EXPECT_BACKENDS"`, so an image whose DeepEP/TE/mamba build silently broke refuses to
start instead of training on a slow fallback. A required backend must be installed; on a host with a CUDA device
it must also work (on a CPU host the GPU image's kernels cannot load, and that is not a broken image).
"""

from __future__ import annotations

import argparse
import json
import os

from trainer import backends
from trainer.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--require",
        default=None,
        metavar="NAMES",
        help=f"comma-separated backends that must be present ({', '.join(backends.BACKENDS)}); "
        "default: $MOE_EXPECT_BACKENDS if --strict, else none",
    )
    parser.add_argument("--strict", action="store_true", help="require the backends named in $MOE_EXPECT_BACKENDS")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def parse_names(text: str | None) -> list[str]:
    """'deepep, te,mamba' -> ['deepep', 'te', 'mamba']; unknown names are a UserError."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in backends.BACKENDS]
    if unknown:
        raise UserError(
            f"unknown backend name(s) {', '.join(unknown)}",
            f"choose from {', '.join(backends.BACKENDS)}",
        )
    return names


def missing_required(required: list[str], table: dict[str, tuple[bool, str]], cuda_present: bool) -> list[str]:
    """The required backends that are absent: not installed, or installed but broken on a CUDA host."""
    missing = []
    for name in required:
        available, _ = table[name]
        if not backends.is_installed(name) or (cuda_present and not available):
            missing.append(name)
    return missing


def run(args: argparse.Namespace) -> int:
    required_text = args.require if args.require is not None else (
        os.environ.get("MOE_EXPECT_BACKENDS", "") if args.strict else ""
    )
    required = parse_names(required_text)
    table = {name: backends.check(name) for name in backends.BACKENDS}
    cuda_present, _ = table["torch"]
    missing = missing_required(required, table, cuda_present)

    if args.json:
        rows = {n: {"available": a, "detail": d, "required": n in required} for n, (a, d) in table.items()}
        print(json.dumps({"backends": rows, "missing_required": missing}, indent=2))
    else:
        for name, (available, detail) in table.items():
            mark = "ok " if available else ("MISSING" if name in missing else "-- ")
            print(f"  {mark:7s} {name:10s} {detail}")
    if missing:
        details = "; ".join(f"{n}: {table[n][1]}" for n in missing)
        raise UserError(
            f"this image was built to have {', '.join(missing)} but they are not usable ({details})",
            "rebuild the image (make images) or unset MOE_EXPECT_BACKENDS to run on the fallbacks",
        )
    return 0
