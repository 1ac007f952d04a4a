"""The data pipeline at scale: tokenize and pack a generated chat set, measure records/s, memory and start-up.

    python -m bench.data_pipeline --records 1000000 --num-proc 2 --ranks 2

1. writes `--records` chat records (1-3 user/assistant exchanges, some with a system turn) to <workdir>/chat.jsonl
   (not timed);
2. cold start: `--ranks` processes (gloo, as under torchrun) run the trainer's own `prepare_data` on an empty cache:
   local rank 0 tokenizes with `--num-proc` processes while the others wait, then every rank memory-maps the cache,
   plans the epoch (`epoch_shape`) and packs its share of one epoch into micro-batches (`StatefulLoader`);
3. warm start: the same ranks again, fresh processes, with the cache built: the start-up is `prepare_data` plus the
   epoch plan, and nothing is tokenized.

Reported: records/s of tokenizing + packing (records / wall time of step 2 up to the last rank's last micro-batch),
each part on its own, peak resident memory per rank (and of the tokenizing processes), and the warm start-up.
The tokenizer is the shipped one (`builtin:tokenizer`, a small BPE vocabulary with a chat template).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the model routes each token to two experts of eight while the router learns a balanced load across "
         "layers tokens batches gradients optimizer checkpoint export serve answer question compute reverse "
         "translate summarize explain list count sort").split()


def write_chat_set(path: Path, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def sentence(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    with open(path, "w") as f:
        for i in range(records):
            messages = [{"role": "system", "content": sentence(6)}] if i % 5 == 0 else []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": sentence(rng.randint(5, 20))},
                             {"role": "assistant", "content": sentence(rng.randint(5, 40))}]
            f.write(json.dumps({"messages": messages}) + "\n")


def _rss_gib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20


def _rss_parts() -> dict:
    """Private (anonymous) and file-backed resident memory now: the mapped cache's pages are the second kind,
    shared by every rank of the node through the page cache."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                parts[f"{name.lower()}_gib"] = int(value.split()[0]) / 2**20
    return parts


def _rank(rank: int, world: int, port: int, args, phase: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from trainer.build import load_tokenizer
    from trainer.config import load_recipe
    from trainer.data import StatefulLoader
    from trainer.data.budget import epoch_shape
    from trainer.data.prepare import prepare_data

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    recipe = load_recipe("tiny-moe", [f"data.train_path={args.workdir}/chat.jsonl", f"data.seq_len={args.seq_len}",
                                      f"data.cache_dir={args.workdir}/cache", f"data.num_proc={args.num_proc}"])
    tokenizer = load_tokenizer(recipe.model)

    def any_rank(flag: int) -> int:
        value = torch.tensor([flag])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value)

    dist.barrier()
    start = time.perf_counter()
    data = prepare_data(recipe.data, tokenizer, 0, any_rank, rank)
    prepared = time.perf_counter()
    shape = epoch_shape(data.train, args.seq_len, 8, True, True, 0, 8 * world)
    planned = time.perf_counter()
    result = {"rank": rank, "prepare_s": prepared - start, "plan_s": planned - prepared, "startup_s": planned - start,
              "samples": len(data.train), "records": data.stats.records, "rows": shape.rows, "built": data.built}
    if phase == "cold":
        loader = StatefulLoader(data.train, args.seq_len, 8, tokenizer.pad_token_id, True, True, 0, rank, world)
        batches = 0
        while loader.epoch == 0 and loader.cursor < len(data.train):
            next(loader)
            batches += 1
        result.update(pack_s=time.perf_counter() - planned, micro_batches=batches)
    dist.barrier()
    result.update(end=time.perf_counter() - start, peak_rss_gib=_rss_gib(),
                  workers_peak_rss_gib=_rss_gib(resource.RUSAGE_CHILDREN), **_rss_parts())
    Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(args, phase: str) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = [os.path.join(args.workdir, f"{phase}-rank{r}.json") for r in range(args.ranks)]
    procs = [mp.get_context("spawn").Process(target=_rank, args=(r, args.ranks, port, args, phase, outs[r]))
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        sys.exit(f"a rank failed in the {phase} run")
    return [json.loads(Path(o).read_text()) for o in outs]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--workdir", default="", help="default: a temporary directory, removed at the end")
    args = parser.parse_args(argv)
    temporary = not args.workdir
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="moe-data-bench-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(Path(args.workdir) / "cache", ignore_errors=True)
    try:
        t = time.perf_counter()
        write_chat_set(Path(args.workdir) / "chat.jsonl", args.records)
        print(f"generated {args.records} chat records in {time.perf_counter() - t:.1f} s", flush=True)
        cold, warm = _run(args, "cold"), _run(args, "warm")
    finally:
        if temporary:
            shutil.rmtree(args.workdir, ignore_errors=True)
    tokenize_s = max(r["prepare_s"] for r in cold)
    pack_s = max(r["plan_s"] + r["pack_s"] for r in cold)
    report = {
        "records": args.records, "num_proc": args.num_proc, "ranks": args.ranks, "seq_len": args.seq_len,
        "records_per_s": args.records / (tokenize_s + pack_s), "tokenize_records_per_s": args.records / tokenize_s,
        "pack_records_per_s": args.records / pack_s, "tokenize_s": tokenize_s, "pack_s": pack_s,
        "peak_rss_gib_per_rank": [round(r["peak_rss_gib"], 3) for r in cold + warm],
        "rss_anon_gib_per_rank": [round(r.get("rssanon_gib", 0), 3) for r in cold + warm],
        "rss_file_gib_per_rank": [round(r.get("rssfile_gib", 0), 3) for r in cold + warm],
        "tokenizer_workers_peak_rss_gib": max(r["workers_peak_rss_gib"] for r in cold),
        "warm_startup_s": max(r["startup_s"] for r in warm), "warm_built": sum(len(r["built"]) for r in warm),
        "samples": cold[0]["samples"], "rows_per_epoch": cold[0]["rows"],
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
