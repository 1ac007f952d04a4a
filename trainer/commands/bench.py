"""`moe bench`: benchmark this trainer against transformers native on the same job (bench/compare.py).

The benchmark scripts live in the repository's `bench/` folder (not in the installed package): run from a checkout.
"""

from __future__ import annotations

import argparse

from trainer.errors import UserError


def _compare_module():
    try:
        from bench import compare
    except ImportError as err:
        raise UserError(
            f"the benchmark scripts are not importable ({err})",
            "run `moe bench` from a repository checkout (the folder that contains bench/), or "
            "`python -m bench.compare` there",
        ) from None
    return compare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from bench import compare
    except ImportError:
        parser.epilog = "bench/ not importable here: run from a repository checkout"
        return
    compare.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return _compare_module().run(args)
