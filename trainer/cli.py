"""The `moe` console entry point: one command, one subcommand per job.

Each subcommand lives in `trainer/commands/<name>.py` with `add_arguments(parser)` and `run(args) -> int`,
imported only when chosen so `moe --help` stays fast and optional dependencies stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from trainer.errors import EXIT_USER_ERROR, UserError
from trainer.redact import redact

SUBCOMMANDS = {
    "train": "fine-tune a model from a recipe (a preset name or a YAML path) with key=value overrides",
    "export": "write a standard Hugging Face checkpoint from a run directory or checkpoint",
    "models": "list the recipe presets and the model families with a fast path",
    "plan": "estimate per-GPU memory and rank the parallel layouts that fit, before launching",
    "bench": "benchmark this trainer against transformers native on the same job",
    "doctor": "print which backends are active (torch/CUDA, grouped GEMM, DeepEP, TE, mamba kernels, NCCL)",
}


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported like every other bad input: one `error:` line, exit code 2, and no
    silent abbreviations (a mistyped `--no-progres` is an error, not a guess)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moe", description="Mixture-of-Experts fine-tuning on transformers v5.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, help_text in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=f"trainer.commands.{name}")
        # Arguments are added lazily (see main) unless --help is asked for this subcommand.
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as done:  # argparse: --help (0) or a usage error (2, already printed); a code, not an exit
        return int(done.code or 0)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in SUBCOMMANDS:
        args = parser.parse_args(argv)  # --help, or an unknown command: argparse says which exist
        return run_command(importlib.import_module(args._module).run, args)
    module = importlib.import_module(f"trainer.commands.{command}")
    sub = parser._subparsers._group_actions[0].choices[command]  # noqa: SLF001 - argparse has no public accessor
    module.add_arguments(sub)
    # Intermixed: options may come before, between or after the key=value overrides
    # (`moe plan tiny-moe --gpus 8 data.seq_len=4096`). argparse does this per parser, not across subparsers.
    rest = argv[argv.index(command) + 1:]
    args = sub.parse_intermixed_args(rest)
    args.command, args._module = command, f"trainer.commands.{command}"
    return run_command(module.run, args)


def run_command(run, args) -> int:
    """Run a command's `run(args)`: a UserError becomes one redacted `error:` line and exit code 2; any other
    exception (a bug) keeps its traceback, redacted too (a credential can sit in a path or a URL in it)."""
    try:
        return int(run(args) or 0)
    except UserError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - printed in full, only with secrets replaced
        print(redact("".join(traceback.format_exception(err))), file=sys.stderr, end="")
        return 1


if __name__ == "__main__":
    sys.exit(main())
