"""Run a function in N processes (like torchrun would: gloo on CPU, or NCCL with one GPU per rank) and collect what
each rank returns."""

from __future__ import annotations

import os
import queue as queue_module
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, queue, args, timeout, backend="gloo"):
    import faulthandler

    faulthandler.dump_traceback_later(max(5.0, timeout * 0.7), exit=True)  # a hung rank shows where it hangs
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        queue.put((rank, "ok", fn(*args)))
    except BaseException:  # report every failure to the parent, which raises it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 90.0, backend: str = "gloo") -> list:
    """fn(*args) on ranks 0..world_size-1 (gloo on CPU, or "nccl": rank r on GPU r); returns the per-rank results
    in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args, timeout, backend),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world_size):
            # After a first failure the other ranks usually fail too (a peer's closed connection); their reports
            # still come, and the first to arrive is not always the cause, so every report is kept.
            try:
                rank, status, value = queue.get(timeout=timeout if not errors else 10.0)
            except queue_module.Empty:
                if errors:
                    break
                raise
            if status == "error":
                errors[rank] = value
            else:
                results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        exits = ", ".join(f"rank {r}: {p.exitcode}" for r, p in enumerate(procs))
        report = "\n".join(f"rank {r}:\n{errors[r]}" for r in sorted(errors))
        silent = [r for r in range(world_size) if r not in errors and r not in results]
        raise AssertionError(f"{report}\nranks that sent no report: {silent or 'none'}; exit codes ({exits})")
    return [results[r] for r in range(world_size)]
