"""`python -m eval serve`: start `transformers serve` on an export, the CPU stand-in for the vLLM server.

It speaks the same OpenAI-style endpoints the validator uses (/health, /v1/models, /v1/completions,
/v1/chat/completions); it returns no logprobs, so logprob checks are skipped against it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path

from trainer.errors import UserError


def ensure_port_free(host: str, port: int) -> None:
    """UserError if something already listens on host:port (checked by binding, as the server will)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as uvicorn sets it: lingering TIME_WAIT connections of a stopped server are not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is already in use", "stop the other server or pass --port") from None


def serve_command(export: str | Path, host: str, port: int, device: str = "cpu") -> list[str]:
    """The `transformers serve` command line that preloads `export` (so /health is up only once it is loaded)."""
    return [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(export),
        "--host", host, "--port", str(port), "--device", device, "--dtype", "auto", "--log-level", "warning",
    ]


def serve_environment() -> dict:
    # Offline: the export is local and a server must not stall on a hub update check.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}


def serve(export: str | Path, port: int, host: str = "127.0.0.1", device: str = "cpu") -> int:
    """Replace this process with the server (exec), so signals sent to the helper reach the server itself."""
    if not (Path(export) / "config.json").is_file():
        raise UserError(f"{export} is not an exported checkpoint (no config.json)", "pass the directory that `moe export` wrote")
    ensure_port_free(host, port)
    missing = [m for m in ("fastapi", "uvicorn", "openai", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        # accelerate: transformers serve always loads with a device_map, which needs it.
        raise UserError(f"transformers serve needs {', '.join(missing)}", "pip install 'transformers[serving]' accelerate")
    command = serve_command(export, host, port, device)
    os.execve(command[0], command, serve_environment())
    return 0  # not reached
