"""Two gloo ranks preparing the same data: one tokenizes, both read the same memory-mapped cache, and their loaders
hand out disjoint micro-batches that together cover the epoch."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

WORLD = 2


def _records(path):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Sample {i}: {i} + 1?"},
                                                     {"role": "assistant", "content": f"{i + 1}."}]}) + "\n"
                            for i in range(300)))


def _rank(rank: int, port: int, data_path: str, cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from trainer.build import load_tokenizer
    from trainer.config import load_recipe
    from trainer.data import StatefulLoader
    from trainer.data.prepare import prepare_data

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)

    def any_rank(flag: int) -> int:
        value = torch.tensor([flag])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value)

    recipe = load_recipe("tiny-moe", [f"data.train_path={data_path}", f"data.cache_dir={cache}", "data.seq_len=64"])
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, 0, any_rank, local_rank=rank)
    loader = StatefulLoader(data.train, 64, 2, tokenizer.pad_token_id, True, True, 0, rank, WORLD)
    rows = []
    while loader.epoch == 0 and loader.cursor < len(data.train):
        batch = next(loader)
        rows += [tuple(r.tolist()) for r in batch["input_ids"]]
    result = {"built": data.built, "cache": str(data.train.store.cache), "rows": rows, "samples": len(data.train)}
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_share_one_cache_and_get_disjoint_shards(tmp_path):
    _records(tmp_path / "chat.jsonl")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = [str(tmp_path / f"rank{r}.json") for r in range(WORLD)]
    procs = [mp.get_context("spawn").Process(target=_rank, args=(r, port, str(tmp_path / "chat.jsonl"),
                                                                 str(tmp_path / "cache"), outs[r]))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads(open(o).read()) for o in outs]
    assert [len(r["built"]) for r in results] == [1, 0]  # local rank 0 tokenized, rank 1 waited and read
    assert results[0]["cache"] == results[1]["cache"] and len(os.listdir(tmp_path / "cache")) == 1
    rows = [set(map(tuple, r["rows"])) for r in results]
    assert rows[0] and rows[1] and not rows[0] & rows[1]
