"""Turn one SFT record into token ids and next-token targets, with loss only on the answer.

Records of every schema `trainer.data.schemas` knows (ShareGPT, Alpaca, content as a list of parts, ...) are first
mapped onto one of three kinds:
  chat               {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
                     rendered with the tokenizer's chat template; every assistant turn (with its end-of-turn
                     token) is trained on, everything else is context.
  prompt_completion  {"prompt": ..., "completion": ...}: prompt tokens, then completion tokens and EOS;
                     only the completion and EOS are trained on.
  text               {"text": ...} (continued pre-training): BOS if the tokenizer adds one, the text, EOS; every
                     token is trained on.

The result is already shifted: `targets[t]` is the token the model must predict after reading `input_ids[: t + 1]`,
or -100 (ignored). Shifting per sample here, not in the loop, is what lets packed samples stay independent.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from trainer.data.schemas import canonical
from trainer.errors import UserError

IGNORE_INDEX = -100
# Roles chat templates know. Any other role (a typo such as "assitant", or "bot") would be rendered by most templates
# as context or dropped, so the turn meant as the answer would silently not be trained on.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class TokenizedSample:
    input_ids: list[int]  # [n]
    loss_mask: list[bool]  # [n]: True where input_ids[t] is a token the model must learn to produce

    def __len__(self) -> int:
        return len(self.input_ids)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [n], targets [n]) as int64 arrays, for the packer."""
        return np.asarray(self.input_ids, dtype=np.int64), np.asarray(self.targets(), dtype=np.int64)

    def targets(self) -> list[int]:
        """Next-token targets [n]: input_ids[t + 1] where that token is trained on, else -100 (last is always -100)."""
        shifted = [tok if keep else IGNORE_INDEX for tok, keep in zip(self.input_ids[1:], self.loss_mask[1:])]
        return shifted + [IGNORE_INDEX]


def render_record(record: dict, tokenizer, data_format: str = "auto", columns: dict | None = None) -> TokenizedSample:
    """Tokenize one record (see the module docstring; `data_format` is a schema name or auto)."""
    kind, record = canonical(record, data_format, columns)
    if kind == "chat":
        return render_chat(_checked_messages(record), tokenizer)
    if kind == "text":
        return render_text(record["text"], tokenizer)
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        source = record.get("_source", "a record")
        raise UserError(f"{source} needs string 'prompt' and 'completion'", "fix that record")
    return render_prompt_completion(prompt, completion, tokenizer)


def render_text(text: str, tokenizer) -> TokenizedSample:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return TokenizedSample(ids, [True] * len(ids))


def render_prompt_completion(prompt: str, completion: str, tokenizer) -> TokenizedSample:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return TokenizedSample(prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids))


def render_chat(messages: list[dict], tokenizer) -> TokenizedSample:
    """Render with the chat template; tokens whose characters fall inside an assistant turn are trained on.

    An assistant turn's characters are found by rendering the conversation up to it (with the generation prompt)
    and through it: the difference is the turn, closing tokens included. Templates that rewrite earlier turns
    (e.g. dropping reasoning) break that prefix property; for those the turn's content is located directly.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template", "use prompt/completion data or a chat tokenizer")
    text = _apply_template(tokenizer, messages, add_generation_prompt=False)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = text if i == len(messages) - 1 else _apply_template(tokenizer, messages[: i + 1],
                                                                        add_generation_prompt=False)
        if text.startswith(through) and through.startswith(before) and len(through) > len(before) >= cursor:
            start, end = len(before), len(through)
        else:
            start = text.find(message["content"], cursor)
            if start < 0:
                raise UserError("the chat template drops assistant content", "use prompt/completion data instead")
            end = start + len(message["content"])
            eos = tokenizer.eos_token or ""
            if eos and text.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    ids, offsets = _encode_with_offsets(tokenizer, text)
    return TokenizedSample(ids, _mask_of_spans([start for start, _ in offsets], spans))


def _mask_of_spans(token_starts: list[int], spans: list[tuple[int, int]]) -> list[bool]:
    """True for each token whose first character lies in one of the sorted, disjoint character `spans`."""
    if token_starts == sorted(token_starts):  # the usual case: a span is one slice of tokens
        mask = [False] * len(token_starts)
        for start, end in spans:
            a, b = bisect.bisect_left(token_starts, start), bisect.bisect_left(token_starts, end)
            mask[a:b] = [True] * (b - a)
        return mask
    span_starts, span_ends = [s for s, _ in spans], [e for _, e in spans]
    mask = []
    for char_start in token_starts:
        i = bisect.bisect_right(span_starts, char_start) - 1
        mask.append(i >= 0 and char_start < span_ends[i])
    return mask


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text` without special tokens; straight through the Rust tokenizer when
    there is one (the same encoding `tokenizer(text, add_special_tokens=False)` returns, without its overhead)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), encoded["offset_mapping"]


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _checked_messages(record: dict) -> list[dict]:
    messages = record.get("messages")
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not ok:
        raise UserError(
            f"{record.get('_source', 'a record')} has malformed 'messages'",
            "write a list of {\"role\": ..., \"content\": ...} objects",
        )
    unknown = next((i for i, m in enumerate(messages) if m["role"] not in CHAT_ROLES), None)
    if unknown is not None:
        raise UserError(f"{record.get('_source', 'a record')} has a message with the unknown role "
                        f"{messages[unknown]['role'][:40]!r} (message {unknown + 1})",
                        f"use one of {', '.join(CHAT_ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{record.get('_source', 'a record')} has no assistant turn", "add the answer to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
