"""Fast checks of the optional GPU pieces before a benchmark (no pytest needed): each prints PASS / FAIL / SKIP.

    python -m bench.selftest            # ~30 s on a GPU; on CPU the GPU-only checks are skipped

1. fused expert MLP vs the unfused path in bf16 with the real grouped_mm kernel, some experts without tokens
   (also catches a kernel that leaves empty experts' weight gradients uninitialised);
2. linear cross-entropy: chunked and Liger vs the full-logits formula;
3. optimizer stepping in backward == fused AdamW after backward;
4. Liger RMSNorm == HF RMSNorm; torch.compile of one tiny decoder layer runs.
A FAIL only says which option not to trust; the benchmark itself still runs every variant.
"""

from __future__ import annotations

import sys
import traceback

import torch

RESULTS: list[tuple[str, str, str]] = []


def check(name):
    def decorator(fn):
        def wrapper():
            try:
                detail = fn()
                status = "SKIP" if isinstance(detail, str) and detail.startswith("skip") else "PASS"
            except Exception as err:
                status, detail = "FAIL", f"{type(err).__name__}: {err}"
                traceback.print_exc()
            RESULTS.append((status, name, str(detail or "")))
            print(f"{status} {name} {detail or ''}", flush=True)

        wrapper.__name__ = fn.__name__
        CHECKS.append(wrapper)
        return wrapper

    return decorator


CHECKS = []


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _tiny_qwen(**overrides):
    from transformers import Qwen3MoeConfig

    kwargs = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
                  num_experts_per_tok=4, norm_topk_prob=True, output_router_logits=True, use_cache=False)
    kwargs.update(overrides)
    return Qwen3MoeConfig(**kwargs)


@check("fused experts bf16 == unfused (grouped_mm, empty experts)")
def fused_experts():
    from trainer.models import MoEAutoModelForCausalLM
    from trainer.moe.experts import fast_experts_forward, set_fused_experts

    device = _device()
    torch.manual_seed(0)
    with torch.device(device):
        model = MoEAutoModelForCausalLM.from_config(_tiny_qwen(), dtype=torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    tokens = 512
    index = torch.rand(tokens, 12, device=device).argsort(-1)[:, :4]  # experts 12..15 get no tokens
    weights = torch.rand(tokens, 4, device=device)
    x = torch.randn(tokens, 256, device=device, dtype=torch.bfloat16)
    from trainer.kernels.fused_expert_mlp import _liger_swiglu

    grads = {}
    modes = [(False, "torch"), (True, "torch")] + ([(True, "liger")] if device.type == "cuda" and _liger_swiglu() else [])
    for fused, backend in modes:
        set_fused_experts(experts, fused, activation_backend=backend)
        experts.zero_grad(set_to_none=True)
        if fused and device.type == "cuda":  # poison the allocator: uninitialised memory now reads as NaN
            torch.full((64 << 20,), float("nan"), device=device)  # allocated and freed at once
        xi = x.clone().requires_grad_(True)
        wi = weights.clone().requires_grad_(True)
        out = fast_experts_forward(experts, xi, index, wi)
        out.float().square().sum().backward()
        grads[(fused, backend)] = (out.detach(), xi.grad, wi.grad, experts.gate_up_proj.grad.clone(),
                                   experts.down_proj.grad.clone())
    report = []
    for mode in modes[1:]:
        errors = [_rel(a, b) for a, b in zip(grads[mode], grads[(False, "torch")])]
        empty = grads[mode][3][12:]
        assert torch.isfinite(empty).all() and empty.abs().max().item() == 0, f"{mode}: empty experts' grads not zero"
        assert max(errors) < 2e-2, f"{mode}: relative errors {errors}"
        report.append(f"{mode[1]} activation: max rel err {max(errors):.1e}")
    return "; ".join(report)


@check("linear cross-entropy chunked/liger == full logits")
def linear_ce():
    from trainer.kernels.linear_cross_entropy import linear_cross_entropy_sum, liger_available

    device = _device()
    torch.manual_seed(0)
    h = torch.randn(4096, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(32000, 256, device=device) * 0.05).bfloat16().requires_grad_(True)
    t = torch.randint(0, 32000, (4096,), device=device)
    t[::7] = -100
    out = {}
    backends = ["reference", "chunked"] + (["liger"] if liger_available() else [])
    for backend in backends:
        loss = linear_cross_entropy_sum(h, w, t, backend=backend)
        gh, gw = torch.autograd.grad(loss, (h, w))
        out[backend] = (loss.detach(), gh, gw)
    errs = {b: max(_rel(x, y) for x, y in zip(out[b], out["reference"])) for b in backends[1:]}
    assert all(e < 2e-2 for e in errs.values()), errs
    return " ".join(f"{b}: {e:.1e}" for b, e in errs.items()) + ("" if "liger" in errs else " (liger not importable)")


@check("optimizer in backward == fused AdamW after backward")
def in_backward():
    from trainer.perf import PerfOptions
    from trainer.step_optimizer import build_optimizer

    device = _device()
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)
    x = torch.randn(32, 64, device=device)
    finals = []
    for spec in ("fused-adamw", "opt-in-bwd"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)
        model.load_state_dict(base.state_dict())
        opt = build_optimizer(model, PerfOptions.parse(spec), lr=1e-2)
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    err = _rel(finals[1], finals[0])
    assert err < 1e-5, err
    return f"rel diff {err:.1e}"


@check("liger RMSNorm == HF RMSNorm; compile of a tiny layer runs")
def norms_and_compile():
    if not torch.cuda.is_available():
        return "skip: needs CUDA"
    from trainer.models import MoEAutoModelForCausalLM
    from trainer.perf import PerfOptions, apply_optimizations, causal_lm_loss

    ids = torch.randint(0, 512, (2, 128), device="cuda")
    losses = {}
    for spec in ("base", "liger", "compile"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = MoEAutoModelForCausalLM.from_config(_tiny_qwen(), dtype=torch.bfloat16, attn_implementation="sdpa")
        options = PerfOptions.parse(spec)
        notes = apply_optimizations(model, options)
        losses[spec] = causal_lm_loss(model, ids, ids, options).loss.item()
        print("   ", spec, notes, losses[spec])
    assert abs(losses["liger"] - losses["base"]) < 2e-2 * abs(losses["base"]), losses
    assert abs(losses["compile"] - losses["base"]) < 2e-2 * abs(losses["base"]), losses
    return str(losses)


def main() -> int:
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {_device()}", flush=True)
    for run in CHECKS:
        run()
    failed = [r for r in RESULTS if r[0] == "FAIL"]
    print(f"selftest: {len(RESULTS) - len(failed)} ok, {len(failed)} failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
