"""A small OpenAI-compatible HTTP client (stdlib only) that works against vLLM and `transformers serve` alike.

The servers differ in what they return, so the client probes once and records it in `ServerCapabilities`:

| server | /v1/completions | completion logprobs / echo | generated token ids | /v1/chat/completions |
|---|---|---|---|---|
| vLLM (>= 0.10.2) | yes | yes (`logprobs`, `echo`, `text_offset`) | yes (`return_token_ids`) | yes |
| transformers serve (5.17) | yes | no (accepted, ignored: `logprobs` is absent from the answer) | no | yes |

Everything downstream asks the capabilities instead of the server's name.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from trainer.errors import UserError


@dataclass
class ServerCapabilities:
    """What one server answered during the probe."""

    completions: bool  # /v1/completions exists
    completion_logprobs: bool  # it returns per-token logprobs (+ echo for prompt tokens)
    models: list[str]  # ids from /v1/models (may be empty: transformers serve lists only its hub cache)
    token_ids: bool = False  # completions carry the generated token ids (`return_token_ids`, vLLM)


class HTTPError(RuntimeError):
    """A non-2xx answer; `status` is the HTTP code, str() holds the body's first line."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def first_choice(answer: dict, endpoint: str) -> dict:
    """answer["choices"][0], or a UserError when the server sent no choice (an empty list, or none at all)."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UserError(f"{endpoint} answered without any choice ({str(answer)[:80]})",
                        "check the server's log: it returned an empty completion")
    return choices[0]


class OpenAIClient:
    """JSON over HTTP to an OpenAI-style server at `base_url` (e.g. http://127.0.0.1:8000).

    Every request has a deadline (`request_timeout` seconds for the whole answer, not only per socket read, so a
    server that trickles bytes cannot stall the validator), and every answer that is not what the API promises
    (not JSON, nested absurdly deep, no choices) is a one-line UserError naming the endpoint.
    """

    def __init__(self, base_url: str, model: str | None = None, request_timeout: float = 300.0):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.request_timeout = request_timeout

    # ----- transport -----

    def _send(self, method: str, path: str, body: dict | None, timeout: float) -> str:
        """The answer's text; HTTPError for a non-2xx answer, TimeoutError past the deadline, OSError otherwise."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        deadline = time.monotonic() + timeout
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                chunks = []
                while chunk := response.read(1 << 16):
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no complete answer within {timeout:g}s")
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace").strip().splitlines()
            raise HTTPError(err.code, detail[0] if detail else err.reason) from None
        return b"".join(chunks).decode(errors="replace")

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        """The answer as JSON; HTTPError for a non-2xx answer, UserError for anything else that went wrong."""
        timeout = timeout or self.request_timeout
        where = f"{method} {self.base_url}{path}"
        try:
            text = self._send(method, path, body, timeout)
        except HTTPError:
            raise
        except TimeoutError:
            raise UserError(f"{where} got no complete answer within {timeout:g}s",
                            "check that the server is not stalled or overloaded, or raise --request-timeout") from None
        except (urllib.error.URLError, OSError) as err:
            raise UserError(f"{where} failed ({getattr(err, 'reason', err)})",
                            "check that the server is running and --base-url is right") from None
        try:
            answer = json.loads(text) if text.strip() else {}
        except (ValueError, RecursionError):
            raise UserError(f"{where} answered something that is not JSON ({text[:60]!r})",
                            "point --base-url at an OpenAI-compatible server") from None
        if not isinstance(answer, dict):
            raise UserError(f"{where} answered JSON that is not an object", "point --base-url at an OpenAI-compatible "
                            "server")
        return answer

    def _with_model(self, body: dict) -> dict:
        return {**body, "model": self.model} if self.model else body

    # ----- health -----

    def wait_healthy(self, timeout: float, poll_interval: float = 0.5) -> float:
        """Poll GET /health until it answers 200; return the seconds waited. UserError after `timeout` seconds."""
        start = time.monotonic()
        last_error = "no answer"
        while True:
            try:
                self._send("GET", "/health", None, timeout=max(1.0, min(5.0, timeout)))
                return time.monotonic() - start
            except HTTPError as err:
                last_error = str(err)
            except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out: still starting
                last_error = str(getattr(err, "reason", err))
            if time.monotonic() - start >= timeout:
                raise UserError(
                    f"server at {self.base_url} did not become healthy within {timeout:g}s (last: {last_error})",
                    "check the server's log, or raise --timeout if the model is still loading",
                )
            time.sleep(poll_interval)

    # ----- probing -----

    def list_models(self) -> list[str]:
        try:
            return [m["id"] for m in self._request("GET", "/v1/models").get("data", [])]
        except (HTTPError, KeyError, TypeError):
            return []

    def probe(self) -> ServerCapabilities:
        """Find out which endpoints and fields this server supports (one or two tiny requests)."""
        models = self.list_models()
        guessed = self.model is None and len(models) == 1
        if guessed:
            self.model = models[0]
        try:
            answer = self._probe_completion()
        except HTTPError as err:
            if guessed and err.status == 400:  # the listed model is not the one served (transformers serve)
                self.model = None
                return self.probe_without_listing(models)
            if err.status in (404, 405):
                return ServerCapabilities(completions=False, completion_logprobs=False, models=models)
            raise self._probe_failed(err) from None
        return self._capabilities(answer, models)

    def probe_without_listing(self, models: list[str]) -> ServerCapabilities:
        try:
            answer = self._probe_completion()
        except HTTPError as err:
            if err.status in (404, 405):
                return ServerCapabilities(completions=False, completion_logprobs=False, models=models)
            raise self._probe_failed(err) from None
        return self._capabilities(answer, models)

    def _probe_completion(self) -> dict:
        """One-token completion asking for everything; again without `return_token_ids` where that is refused."""
        try:
            return self.complete("Hello", max_tokens=1, logprobs=1, echo=True, token_ids=True)
        except HTTPError as err:
            if err.status not in (400, 422):  # a server with a strict schema refuses the unknown field
                raise
        return self.complete("Hello", max_tokens=1, logprobs=1, echo=True)

    def _probe_failed(self, err: HTTPError) -> UserError:
        return UserError(f"{self.base_url}/v1/completions refused the probe request ({err})",
                         "check the server's log and that --model names the served model")

    @staticmethod
    def _capabilities(answer: dict, models: list[str]) -> ServerCapabilities:
        logprobs = first_choice(answer, "/v1/completions").get("logprobs") or {}
        has_logprobs = bool(logprobs.get("token_logprobs")) and bool(logprobs.get("text_offset"))
        has_ids = isinstance(first_choice(answer, "/v1/completions").get("token_ids"), list)
        return ServerCapabilities(completions=True, completion_logprobs=has_logprobs, models=models, token_ids=has_ids)

    # ----- endpoints -----

    def complete(
        self, prompt: str, max_tokens: int, logprobs: int | None = None, echo: bool = False, token_ids: bool = False
    ) -> dict:
        """POST /v1/completions with greedy decoding (temperature 0); returns the raw JSON answer.

        token_ids: ask for the generated token ids (vLLM's `return_token_ids`; the choice's `token_ids`).
        """
        body: dict = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if logprobs is not None:
            body["logprobs"] = logprobs
        if echo:
            body["echo"] = True
        if token_ids:
            body["return_token_ids"] = True
        return self._request("POST", "/v1/completions", self._with_model(body))

    def chat(self, messages: list[dict], max_tokens: int) -> dict:
        """POST /v1/chat/completions with greedy decoding; returns the raw JSON answer."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        return self._request("POST", "/v1/chat/completions", self._with_model(body))
