"""A small multiple-choice task scored by log-likelihood, locally with transformers and through the server.

Each line of a task file is `{"question": str, "choices": [str, ...], "answer": int}`. The prediction is the
choice with the highest summed log-likelihood of `" " + choice` after `question`. Locally this says whether the
fine-tuned model still knows things; through the server (echoed prompt logprobs, where the server returns them)
the picks must agree with the local ones, which is a second parity check on the served weights.
"""

from __future__ import annotations

from pathlib import Path

from eval.client import HTTPError, OpenAIClient, ServerCapabilities, first_choice
from eval.jsonl import read_objects
from eval.reference import Reference
from trainer.errors import UserError

DEFAULT_TASK = Path(__file__).parent / "data" / "multiple_choice.jsonl"


def load_task(path: str | Path = DEFAULT_TASK) -> list[dict]:
    """Read and check a task file; UserError names the first bad line."""
    rows = []
    for number, row in read_objects(path, "--task"):
        if not (isinstance(row.get("question"), str) and isinstance(row.get("choices"), list)
                and isinstance(row.get("answer"), int) and 0 <= row["answer"] < len(row["choices"])):
            raise UserError(f"{path}:{number} is not a multiple-choice item", 'write {"question", "choices", "answer": index}')
        rows.append(row)
    return rows


def served_loglikelihood(client: OpenAIClient, context: str, continuation: str) -> float:
    """Sum of the server's echoed prompt-token logprobs for tokens starting at or after len(context)."""
    answer = client.complete(context + continuation, max_tokens=1, logprobs=1, echo=True)
    logprobs = first_choice(answer, "/v1/completions").get("logprobs") or {}
    offsets, values = logprobs.get("text_offset"), logprobs.get("token_logprobs")
    if not isinstance(offsets, list) or not isinstance(values, list):
        raise UserError("/v1/completions answered an echo request without text_offset/token_logprobs",
                        "validate with --api chat, or use a server that returns prompt logprobs")
    prompt_end = len(context + continuation)
    total = 0.0
    for offset, value in zip(offsets, values):
        if len(context) <= offset < prompt_end and value is not None:
            total += value
    return total


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def evaluate(
    rows: list[dict], reference: Reference, client: OpenAIClient | None, caps: ServerCapabilities | None
) -> dict:
    """Score every item locally and, where the server returns logprobs, through the server.

    Returns {'items', 'local_accuracy', 'server_accuracy' (None if unavailable), 'agreement' (None if unavailable),
    'errors' (items the server failed to score: they count as disagreements), 'first_error'}.
    """
    through_server = client is not None and caps is not None and caps.completion_logprobs
    local_correct = server_correct = agree = errors = 0
    first_error = None
    for row in rows:
        local = [reference.loglikelihood(row["question"], " " + c) for c in row["choices"]]
        local_pick = argmax(local)
        local_correct += local_pick == row["answer"]
        if through_server:
            try:
                served = [served_loglikelihood(client, row["question"], " " + c) for c in row["choices"]]
            except (HTTPError, UserError) as err:
                errors += 1
                first_error = first_error or f"{row['question']!r}: {str(err).splitlines()[0]}"
                continue
            served_pick = argmax(served)
            server_correct += served_pick == row["answer"]
            agree += served_pick == local_pick
    n = max(len(rows), 1)
    return {
        "items": len(rows),
        "local_accuracy": local_correct / n,
        "server_accuracy": server_correct / n if through_server else None,
        "agreement": agree / n if through_server else None,
        "errors": errors,
        "first_error": first_error,
    }
