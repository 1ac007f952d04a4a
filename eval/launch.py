"""Start a server from `eval.serve` as a child process and wait until it answers /health.

For tests and scripts that need the server beside them (compose runs `python -m eval serve` itself). A server
that exits before it is healthy is a one-line UserError with the last line of its log, not a timeout.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from eval.client import OpenAIClient
from eval.serve import build_command, ensure_port_free
from trainer.errors import UserError


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def last_error_line(path: Path) -> str:
    """The log's last line that looks like an error (else its last line): what the one-line message quotes."""
    text = log_tail(path, 200).splitlines()
    for line in reversed(text):
        if "Error" in line or "error" in line:
            return line.strip()[:200]
    return text[-1].strip()[:200] if text else "no output"


class Server:
    """`with Server(export, port, log=...) as server:` a healthy server at server.url; stopped on exit."""

    def __init__(self, export: str | Path, port: int, log: str | Path, host: str = "127.0.0.1",
                 engine: str = "auto", device: str = "cpu", timeout: float = 600.0, **options):
        self.engine, self.command, self.env = build_command(export, port, host, device, engine, **options)
        self.url, self.log, self.timeout, self.host, self.port = f"http://{host}:{port}", Path(log), timeout, host, port
        self.process: subprocess.Popen | None = None
        self.seconds_to_healthy: float | None = None

    def start(self) -> Server:
        ensure_port_free(self.host, self.port)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.seconds_to_healthy = self.wait_ready()
        return self

    def wait_ready(self) -> float:
        client, started = OpenAIClient(self.url), time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                raise UserError(f"the {self.engine} server exited with code {code} before it was healthy "
                                f"({last_error_line(self.log)})", f"read its log: {self.log}")
            try:
                client.wait_healthy(timeout=1.0, poll_interval=0.5)
                return time.monotonic() - started
            except UserError:
                if time.monotonic() - started > self.timeout:
                    self.stop()
                    raise UserError(f"the {self.engine} server was not healthy within {self.timeout:g}s "
                                    f"({last_error_line(self.log)})", f"read its log: {self.log}") from None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
