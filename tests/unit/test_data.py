"""SFT data: formats, answer-only loss masks, file errors, long samples, and a resumable packed stream."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from trainer.config import resolve_path
from trainer.data import IGNORE_INDEX, StatefulLoader, build_dataset, render_record
from trainer.errors import UserError

SEQ_LEN = 128


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_path("builtin:tokenizer"))


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _trained_text(sample, tokenizer) -> str:
    return tokenizer.decode([t for t, keep in zip(sample.input_ids, sample.loss_mask) if keep])


def test_chat_loss_covers_exactly_the_assistant_turns(tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "The capital of Peru is Lima."},
    ]}
    sample = render_record(record, tokenizer)
    assert _trained_text(sample, tokenizer) == "2 + 2 = 4.<|im_end|>\nThe capital of Peru is Lima.<|im_end|>\n"
    assert tokenizer.decode(sample.input_ids) == tokenizer.apply_chat_template(record["messages"], tokenize=False)


def test_prompt_completion_loss_covers_completion_and_eos(tokenizer):
    sample = render_record({"prompt": "Q: 3 + 4?\nA:", "completion": " 7"}, tokenizer)
    assert _trained_text(sample, tokenizer) == " 7<|im_end|>"
    assert sample.input_ids[-1] == tokenizer.eos_token_id


def test_targets_are_the_next_token_where_trained(tokenizer):
    sample = render_record({"prompt": "Q: 3 + 4?\nA:", "completion": " 7"}, tokenizer)
    targets = sample.targets()
    for t in range(len(sample) - 1):
        assert targets[t] == (sample.input_ids[t + 1] if sample.loss_mask[t + 1] else IGNORE_INDEX)
    assert targets[-1] == IGNORE_INDEX


def test_malformed_jsonl_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:3 is not valid JSON"):
        build_dataset(str(path), tokenizer, SEQ_LEN)


def test_record_without_a_known_format_names_its_line(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "a", "completion": "b"}, {"body": "no format"}])
    with pytest.raises(UserError, match=r"odd\.jsonl:2 matches no known schema \(keys: \['body'\]\)"):
        build_dataset(path, tokenizer, SEQ_LEN)


def test_empty_dataset_is_a_user_error(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no records"):
        build_dataset(str(tmp_path / "empty.jsonl"), tokenizer, SEQ_LEN)
    with pytest.raises(UserError, match="does not exist"):
        build_dataset(str(tmp_path / "missing.jsonl"), tokenizer, SEQ_LEN)


def test_long_samples_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    long = {"prompt": "Q: " + "word " * 200, "completion": " answer " * 50}
    short = {"prompt": "Q: hi", "completion": " hello"}
    path = _write_jsonl(tmp_path / "mixed.jsonl", [long, short, short])
    truncated = build_dataset(path, tokenizer, SEQ_LEN, long_samples="truncate")
    # The long prompt alone fills seq_len: truncation leaves nothing to train on, so it is dropped and counted.
    assert truncated.stats.truncated == 1 and truncated.stats.dropped_no_target == 1 and len(truncated) == 2
    dropped = build_dataset(path, tokenizer, SEQ_LEN, long_samples="drop")
    assert dropped.stats.dropped_long == 1 and len(dropped) == 2
    kept = build_dataset(_write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "Q:", "completion": " a" * 300}]),
                         tokenizer, SEQ_LEN)
    assert kept.stats.truncated == 1 and max(len(s) for s in kept.samples) == SEQ_LEN


def test_parquet_is_read_like_jsonl(tmp_path, tokenizer):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"prompt": "Q: 1 + 1?", "completion": " 2"}, {"prompt": "Q: 2 + 2?", "completion": " 4"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    from_parquet = build_dataset(str(tmp_path / "train.parquet"), tokenizer, SEQ_LEN)
    from_jsonl = build_dataset(_write_jsonl(tmp_path / "train.jsonl", rows), tokenizer, SEQ_LEN)
    assert [s.input_ids for s in from_parquet.samples] == [s.input_ids for s in from_jsonl.samples]


@pytest.fixture(scope="module")
def shipped(tokenizer):
    return build_dataset(resolve_path("builtin:data/sft.jsonl"), tokenizer, SEQ_LEN)


def test_packed_rows_restart_positions_per_sample(shipped, tokenizer):
    batch = next(StatefulLoader(shipped, SEQ_LEN, 2, tokenizer.pad_token_id, seed=0))
    assert batch["input_ids"].shape == (2, SEQ_LEN)
    starts = (batch["position_ids"] == 0).sum().item()
    assert starts >= batch["num_samples"].item() > 2  # one restart per sample, plus the padding tails


def test_unpacked_rows_hold_one_sample_padded_to_the_longest(shipped, tokenizer):
    batch = next(StatefulLoader(shipped, SEQ_LEN, 4, tokenizer.pad_token_id, packing=False, seed=0))
    assert batch["num_samples"].item() == 4
    width = batch["input_ids"].shape[1]
    rows = batch["position_ids"].tolist()
    sample_lengths = [next((i for i in range(1, width) if row[i] == 0), width) for row in rows]
    assert max(sample_lengths) == width <= SEQ_LEN


def test_loader_resumes_exactly_from_its_state(shipped, tokenizer):
    def loader():
        return StatefulLoader(shipped, SEQ_LEN, 3, tokenizer.pad_token_id, seed=5)

    straight = loader()
    batches = [next(straight) for _ in range(60)]  # ~12 samples per batch: crosses the epoch boundary (480)
    first = loader()
    for _ in range(17):
        next(first)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    for expected in batches[17:]:
        got = next(resumed)
        assert all(torch.equal(got[k], expected[k]) for k in ("input_ids", "targets", "position_ids"))
    assert straight.state_dict()["epoch"] >= 1


def test_data_parallel_ranks_split_the_stream(shipped, tokenizer):
    single = StatefulLoader(shipped, SEQ_LEN, 1, tokenizer.pad_token_id, seed=0)
    ranks = [StatefulLoader(shipped, SEQ_LEN, 1, tokenizer.pad_token_id, seed=0, dp_rank=r, dp_world_size=2)
             for r in range(2)]
    stream = [next(single)["input_ids"] for _ in range(6)]
    for i in range(3):
        assert torch.equal(next(ranks[0])["input_ids"], stream[2 * i])
        assert torch.equal(next(ranks[1])["input_ids"], stream[2 * i + 1])
