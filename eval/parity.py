"""Greedy parity: the served model's greedy tokens must equal transformers' greedy tokens on the same export.

A served export that differs from its own checkpoint (expert weights not loaded, a wrong key map, a config the
serving engine reads differently) shows up here as a low exact-match rate and an early first divergence.

Where the server returns the generated token ids (vLLM), the ids are compared: a text comparison would count a
generation that ends inside a multi-byte character as a mismatch (transformers decodes the partial byte as U+FFFD,
a streaming detokenizer holds it back). Where it does not (transformers serve), the texts are compared with that
one trailing partial character forgiven. A request the server fails (an HTTP error, a reset connection) is a
failed item with its error recorded, never a crash of the whole validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from eval.client import HTTPError, OpenAIClient, ServerCapabilities, first_choice
from eval.reference import Reference
from trainer.errors import UserError

REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence


@dataclass
class GreedyItem:
    prompt: str
    reference: str
    served: str
    match: bool
    first_divergence_char: int | None  # index into the texts where they first differ; None when equal
    first_divergence_token: int | None  # index of the first reference token not reproduced; None when equal
    max_abs_logprob_diff: float | None  # over the common tokens; None when the server returns no logprobs
    compared: str = "text"  # "token_ids" where the server returned them, else "text"
    error: str | None = None  # the server's failure for this prompt (then match is False)


def first_difference(a: Sequence, b: Sequence) -> int | None:
    """Index of the first item (character of a text, id of a token list) where `a` and `b` differ (the shorter length
    if one is a prefix); None if equal."""
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def texts_match(reference: str, served: str) -> bool:
    """Equal texts, where one trailing partial character (U+FFFD on either side, or held back) is not a mismatch."""
    return reference == served or reference.rstrip(REPLACEMENT) == served.rstrip(REPLACEMENT)


def served_greedy(
    client: OpenAIClient, caps: ServerCapabilities, prompt: str, max_tokens: int
) -> tuple[str, list[float] | None, list[int] | None]:
    """The server's greedy continuation of `prompt`, each token's logprob and the token ids, where it returns them."""
    if caps.completions:
        answer = client.complete(prompt, max_tokens=max_tokens, logprobs=1 if caps.completion_logprobs else None,
                                 token_ids=caps.token_ids)
        choice = first_choice(answer, "/v1/completions")
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        ids = choice.get("token_ids") if caps.token_ids else None
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
            raise UserError(f"/v1/completions answered token_ids that are not integers ({str(ids)[:60]})",
                            "check the server's version: vLLM returns a list of ints for return_token_ids")
        return str(choice.get("text") or ""), logprobs, ids
    answer = client.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens)
    # Chat servers strip the reply (transformers serve and vLLM's parsers do), so chat texts compare stripped.
    message = first_choice(answer, "/v1/chat/completions").get("message") or {}
    return str(message.get("content") or "").strip(), None, None


def request_error(err: Exception) -> str:
    """One line for a failed request: the HTTP status and the body's first line, or the transport failure."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def compare_greedy(
    client: OpenAIClient, caps: ServerCapabilities, reference: Reference, prompts: list[str], max_tokens: int
) -> list[GreedyItem]:
    """Greedy-decode every prompt on both sides and compare text and (where available) token logprobs."""
    items = []
    for prompt in prompts:
        try:
            served_text, served_logprobs, served_ids = served_greedy(client, caps, prompt, max_tokens)
        except (HTTPError, UserError) as err:  # recorded on the item; the reference is not computed for it
            items.append(GreedyItem(prompt, "", "", False, 0, 0, None, error=request_error(err)))
            continue
        if caps.completions:
            ref = reference.greedy(prompt, max_tokens)
        else:
            ref = reference.greedy_chat([{"role": "user", "content": prompt}], max_tokens)
            ref.text = ref.text.strip()
        if served_ids is not None:
            token = first_difference(ref.token_ids, served_ids)
            match = token is None
            char = None if match else first_difference(ref.text, served_text)
        else:
            match = texts_match(ref.text, served_text)
            char = None if match else first_difference(ref.text, served_text)
            token = None if match else reference.prefix_tokens(ref.token_ids, served_text)
        diff = None
        if served_logprobs:
            common = min(len(served_logprobs), len(ref.token_logprobs), token if token is not None else len(ref.token_ids))
            pairs = [(a, b) for a, b in zip(served_logprobs[:common], ref.token_logprobs[:common]) if a is not None]
            diff = max((abs(a - b) for a, b in pairs), default=0.0)
        compared = "text" if served_ids is None else "token_ids"
        items.append(GreedyItem(prompt, ref.text, served_text, match, char, token, diff, compared))
    return items


def summarize_greedy(items: list[GreedyItem]) -> dict:
    """{'prompts', 'exact_match_rate', 'max_abs_logprob_diff', 'compared', 'errors', 'items'} for the report."""
    diffs = [i.max_abs_logprob_diff for i in items if i.max_abs_logprob_diff is not None]
    answered = [i for i in items if i.error is None]
    return {
        "prompts": len(items),
        "exact_match_rate": sum(i.match for i in items) / max(len(items), 1),
        "max_abs_logprob_diff": max(diffs) if diffs else None,
        "compared": sorted({i.compared for i in answered}) or None,
        "errors": sum(i.error is not None for i in items),
        "items": [asdict(i) for i in items],
    }
