"""Common dataset schemas mapped onto the two the renderer knows (chat messages, prompt/completion) plus plain text.

    chat               {"messages": [{"role": ..., "content": ...}, ...]}; content may be a list of parts
                       [{"type": "text", "text": ...}, ...] (OpenAI / HF multimodal style; only text parts exist here)
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}, ...]}
    prompt_completion  {"prompt": ..., "completion": ...}
    alpaca             {"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional)}:
                       one user turn (instruction, a blank line, input) and one assistant turn, through the chat template
    text               {"text": ...}: continued pre-training, every token trained on

`data.columns` renames a dataset's own columns onto these names first ({"messages": "dialog"},
{"prompt": "question", "completion": "answer"}, {"text": "body"}). `auto` picks the schema from the keys, in the
order above. Everything returned is `{"messages": [...]}`, `{"prompt", "completion"}` or `{"text"}`, so the
renderer's checks (roles, an assistant turn) apply to every schema alike.
"""

from __future__ import annotations

from trainer.errors import UserError

SCHEMAS = ("chat", "sharegpt", "prompt_completion", "alpaca", "text")
# ShareGPT speakers -> chat roles (LLaMA-Factory's and axolotl's mapping); anything else is an error naming the line
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_response": "tool"}
SCHEMA_HINT = ("use 'messages', ShareGPT 'conversations', 'prompt'/'completion', Alpaca 'instruction'/'output' or "
               "'text', or map your columns with data.columns")


def detect_schema(record: dict) -> str:
    """The schema of a record from its keys (the first of SCHEMAS whose keys it has)."""
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    keys = sorted(k for k in record if k != "_source")[:12]
    raise UserError(f"{_where(record)} matches no known schema (keys: {keys})", SCHEMA_HINT)


def canonical(record: dict, schema: str = "auto", columns: dict | None = None) -> tuple[str, dict]:
    """(kind, record) with kind "chat" ({"messages"}), "prompt_completion" or "text"; `_source` is kept."""
    if columns:
        record = rename_columns(record, columns)
    schema = detect_schema(record) if schema == "auto" else schema
    where = {"_source": _where(record)}
    if schema == "chat":
        return "chat", {"messages": _text_parts(record, record.get("messages")), **where}
    if schema == "sharegpt":
        return "chat", {"messages": _sharegpt_messages(record), **where}
    if schema == "alpaca":
        return "chat", {"messages": _alpaca_messages(record), **where}
    if schema == "text":
        text = record.get("text")
        if not isinstance(text, str) or not text:
            raise UserError(f"{_where(record)} needs a non-empty string 'text'", "fix that record")
        return "text", {"text": text, **where}
    return "prompt_completion", record


def rename_columns(record: dict, columns: dict) -> dict:
    """The record with `columns` ({schema name: dataset column}) renamed to the schema's names."""
    renamed = dict(record)
    for name, column in columns.items():
        if column in renamed:
            renamed[name] = renamed.pop(column)
    return renamed


def _text_parts(record: dict, messages) -> object:
    """Messages whose content is a list of parts get their text parts joined (anything else is left for the
    renderer's own checks, which name the record)."""
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            message = {**message, "content": _join_parts(record, content)}
        out.append(message)
    return out


def _join_parts(record: dict, parts: list) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise UserError(f"{_where(record)} has a content part of type {str(kind)[:20]!r}",
                            "only text parts ({\"type\": \"text\", \"text\": ...}) can be trained on; drop the others")
        texts.append(part["text"])
    return "".join(texts)


def _sharegpt_messages(record: dict) -> list[dict]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns or not all(
            isinstance(t, dict) and isinstance(t.get("from"), str) for t in turns):
        raise UserError(f"{_where(record)} has malformed 'conversations'",
                        "write a list of {\"from\": ..., \"value\": ...} objects")
    messages = []
    for i, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise UserError(f"{_where(record)} has a turn from the unknown speaker {turn['from'][:40]!r} "
                            f"(turn {i + 1})", f"use one of {', '.join(SHAREGPT_ROLES)}")
        value = turn.get("value")
        messages.append({"role": role, "content": _join_parts(record, value) if isinstance(value, list) else value})
    return messages


def _alpaca_messages(record: dict) -> list[dict]:
    instruction, extra, output = record.get("instruction"), record.get("input") or "", record.get("output")
    if not all(isinstance(v, str) for v in (instruction, extra, output)) or not output:
        raise UserError(f"{_where(record)} needs string 'instruction' and 'output' (and 'input', if any)",
                        "fix that record")
    system = record.get("system")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _where(record: dict) -> str:
    return record.get("_source", "a record")
