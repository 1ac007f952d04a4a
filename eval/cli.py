"""`python -m eval {validate,serve}`: the evaluation entry point (same error contract as `moe`: UserError -> exit 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from trainer.cli import Parser  # usage mistakes are one `error:` line, as in `moe`

    parser = Parser(prog="python -m eval", description="Check a served export against transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="compare a running OpenAI-style server with transformers on the export")
    v.add_argument("--export", required=True, help="the exported checkpoint directory the server serves")
    v.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    v.add_argument("--report", required=True, help="where to write the JSON report")
    v.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /health (default 600)")
    v.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds any one request may take, the whole answer included (default 300)")
    v.add_argument("--model", default=None, help="model name to send (default: the server's only model, or none)")
    v.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per prompt (default 16)")
    v.add_argument("--prompts", default=None, help="JSONL of {'prompt': ...} (default: the shipped set)")
    v.add_argument("--task", default=None, help="multiple-choice JSONL (default: the shipped set)")
    v.add_argument("--min-exact-match", type=float, default=1.0)
    v.add_argument("--logprob-tolerance", type=float, default=0.5)
    v.add_argument("--min-mc-agreement", type=float, default=1.0)
    v.add_argument("--min-accuracy", type=float, default=0.0)
    v.add_argument("--api", choices=["auto", "chat"], default="auto",
                   help="auto: /v1/completions where the server has it, else chat; chat: always chat")
    v.add_argument("--device", default="auto", help="device for the transformers reference (auto: spread over the GPUs' free memory, then "
                   "host memory, when CUDA is present; else cpu)")
    v.add_argument("--dtype", default="auto", help="dtype for the transformers reference (auto: as exported)")

    s = sub.add_parser("serve", help="serve an export with vLLM where it can, else `transformers serve`")
    s.add_argument("--export", required=True)
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--device", default="cpu")
    s.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto",
                   help="auto: vLLM where it serves the model family and is installed, else transformers serve")
    s.add_argument("--served-model-name", default="moe-export", help="the model name vLLM answers to")
    s.add_argument("--vllm-python", default=None,
                   help="interpreter with vllm (default: $MOE_VLLM_PYTHON, .venv-vllm, or this one)")
    s.add_argument("--max-model-len", type=int, default=None, help="vLLM context length (default 2048 on CPU)")
    t = sub.add_parser("tiny-export", help="write a random tiny Qwen3-MoE export (smoke-tests a server, no training)")
    t.add_argument("out_dir")
    t.add_argument("--seed", type=int, default=0)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from eval.serve import serve

        return serve(args.export, args.port, host=args.host, device=args.device, engine=args.engine,
                     served_model_name=args.served_model_name, vllm_python_path=args.vllm_python,
                     max_model_len=args.max_model_len)

    if args.command == "tiny-export":
        from eval.tiny import write_tiny_export

        if Path(args.out_dir).exists() and any(Path(args.out_dir).iterdir()):
            raise UserError(f"{args.out_dir} is not empty", "choose a new directory")
        print(f"wrote {write_tiny_export(args.out_dir, seed=args.seed)}")
        return 0

    from eval import multiple_choice
    from eval.validate import DEFAULT_PROMPTS, Thresholds, summary, validate

    report = validate(
        args.export,
        args.base_url,
        args.report,
        timeout=args.timeout,
        model=args.model,
        max_tokens=args.max_tokens,
        prompts_path=args.prompts or DEFAULT_PROMPTS,
        task_path=args.task or multiple_choice.DEFAULT_TASK,
        limits=Thresholds(args.min_exact_match, args.logprob_tolerance, args.min_mc_agreement, args.min_accuracy),
        device=args.device,
        dtype=args.dtype,
        api=args.api,
        request_timeout=args.request_timeout,
    )
    print(summary(report))
    print(f"report: {args.report}")
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    from trainer.cli import run_command

    return run_command(run, build_parser().parse_args(argv))
