"""`make demo`: the whole chain on CPU in a few minutes, with nothing to download.

Trains the tiny Qwen3-MoE (random init, 2 layers, 8 experts top-2) on the shipped SFT set, exports a Hugging Face
checkpoint, reloads it with plain `transformers.AutoModelForCausalLM`, checks its logits against the trained model,
and greedily answers a chat prompt. Exits non-zero if the loss did not fall or the export disagrees.

    python -m trainer.demo [key=value ...]      # overrides as for `moe train`, e.g. train.max_steps=100
"""

from __future__ import annotations

import sys
import time

import torch

from trainer.config import load_recipe
from trainer.errors import EXIT_USER_ERROR, UserError

DEMO_OVERRIDES = ["output.dir=runs/tiny-moe-demo", "checkpoint.resume=never", "output.overwrite=true"]
PROMPTS = ["What is the capital of France?", "Reverse the word 'river'.", "What is 12 + 7?"]
# fp32 on CPU, but the trained model runs the fast experts path and the reload runs transformers' own kernels:
# same math, different summation order, so allow float32 rounding noise.
LOGITS_ATOL = 1e-4


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()
    try:
        recipe = load_recipe("tiny-moe", DEMO_OVERRIDES + list(argv))
        from trainer.train import train

        result = train(recipe)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR

    window = max(1, min(10, len(result.losses) // 4))
    first, last = _mean(result.losses[:window]), _mean(result.losses[-window:])
    print(f"loss: first {window} steps {first:.3f} -> last {window} steps {last:.3f}")
    if not last < 0.6 * first:
        print("FAIL: the loss did not fall clearly", file=sys.stderr)
        return 1

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = str(result.export_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    trained = result.model.eval()
    messages = [{"role": "user", "content": PROMPTS[0]}]
    input_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        logits_trained = trained(input_ids=input_ids, use_cache=False).logits
        logits_reloaded = reloaded(input_ids=input_ids, use_cache=False).logits
    max_diff = (logits_trained - logits_reloaded).abs().max().item()
    print(f"export reloaded with AutoModelForCausalLM: max |logits difference| = {max_diff:.2e}")
    if not max_diff <= LOGITS_ATOL:
        print(f"FAIL: exported logits differ from the trained model's by more than {LOGITS_ATOL}", file=sys.stderr)
        return 1

    for prompt in PROMPTS:
        print(f"user: {prompt}\nassistant: {_greedy_reply(reloaded, tokenizer, prompt)}")
    print(f"demo finished in {time.perf_counter() - started:.0f}s; run directory {result.run_dir}")
    return 0


def _greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


if __name__ == "__main__":
    sys.exit(main())
