"""Greedy parity: the served model's greedy text must equal transformers' greedy text on the same export.

A served export that differs from its own checkpoint (expert weights not loaded, a wrong key map, a config the
serving engine reads differently) shows up here as a low exact-match rate and an early first divergence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from eval.client import OpenAIClient, ServerCapabilities, first_choice
from eval.reference import Reference


@dataclass
class GreedyItem:
    prompt: str
    reference: str
    served: str
    match: bool
    first_divergence_char: int | None  # index into the texts where they first differ; None when equal
    first_divergence_token: int | None  # index of the first reference token not reproduced; None when equal
    max_abs_logprob_diff: float | None  # over the common tokens; None when the server returns no logprobs


def first_difference(a: str, b: str) -> int | None:
    """Index of the first character where `a` and `b` differ (the shorter length if one is a prefix); None if equal."""
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def served_greedy(
    client: OpenAIClient, caps: ServerCapabilities, prompt: str, max_tokens: int
) -> tuple[str, list[float] | None]:
    """The server's greedy continuation of `prompt` and, where it returns them, each token's logprob."""
    if caps.completions:
        answer = client.complete(prompt, max_tokens=max_tokens, logprobs=1 if caps.completion_logprobs else None)
        choice = first_choice(answer, "/v1/completions")
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        return str(choice.get("text") or ""), logprobs
    answer = client.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens)
    # Chat servers strip the reply (transformers serve and vLLM's parsers do), so chat texts compare stripped.
    message = first_choice(answer, "/v1/chat/completions").get("message") or {}
    return str(message.get("content") or "").strip(), None


def compare_greedy(
    client: OpenAIClient, caps: ServerCapabilities, reference: Reference, prompts: list[str], max_tokens: int
) -> list[GreedyItem]:
    """Greedy-decode every prompt on both sides and compare text and (where available) token logprobs."""
    items = []
    for prompt in prompts:
        served_text, served_logprobs = served_greedy(client, caps, prompt, max_tokens)
        if caps.completions:
            ref = reference.greedy(prompt, max_tokens)
        else:
            ref = reference.greedy_chat([{"role": "user", "content": prompt}], max_tokens)
            ref.text = ref.text.strip()
        char = first_difference(ref.text, served_text)
        token = None if char is None else reference.prefix_tokens(ref.token_ids, served_text)
        diff = None
        if served_logprobs:
            common = min(len(served_logprobs), len(ref.token_logprobs), token if token is not None else len(ref.token_ids))
            pairs = [(a, b) for a, b in zip(served_logprobs[:common], ref.token_logprobs[:common]) if a is not None]
            diff = max((abs(a - b) for a, b in pairs), default=0.0)
        items.append(GreedyItem(prompt, ref.text, served_text, char is None, char, token, diff))
    return items


def summarize_greedy(items: list[GreedyItem]) -> dict:
    """{'prompts', 'exact_match_rate', 'max_abs_logprob_diff', 'items'} for the report."""
    diffs = [i.max_abs_logprob_diff for i in items if i.max_abs_logprob_diff is not None]
    return {
        "prompts": len(items),
        "exact_match_rate": sum(i.match for i in items) / max(len(items), 1),
        "max_abs_logprob_diff": max(diffs) if diffs else None,
        "items": [asdict(i) for i in items],
    }
