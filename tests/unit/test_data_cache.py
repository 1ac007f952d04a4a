"""The token cache: every source form gives the same samples, a second run reads the cache without tokenizing, a
change to anything the tokens depend on builds a new one, and a failed build leaves nothing to be read."""

from __future__ import annotations

import json
import os

import pytest

from trainer.build import load_tokenizer
from trainer.config import load_recipe
from trainer.data import storage
from trainer.data.prepare import prepare_data
from trainer.errors import UserError


def _records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(n)]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_recipe("tiny-moe").model)


def _data(tmp_path, path, *overrides):
    return load_recipe("tiny-moe", [f"data.train_path={path}", f"data.cache_dir={tmp_path / 'cache'}",
                                    "data.seq_len=128", *overrides]).data


def _tokens(dataset) -> list[list[int]]:
    return [dataset[i].input_ids for i in range(len(dataset))]


def test_second_run_reads_the_cache_and_tokenizes_nothing(tmp_path, tokenizer, monkeypatch):
    path = _write_jsonl(tmp_path / "chat.jsonl", _records(50))
    first = prepare_data(_data(tmp_path, path), tokenizer)
    assert first.built == [str(path)]

    def no_tokenizing(task):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(storage, "_tokenize_shard", no_tokenizing)
    second = prepare_data(_data(tmp_path, path), tokenizer)
    assert second.built == [] and _tokens(second.train) == _tokens(first.train)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_a_changed_file_seq_len_or_template_builds_a_new_cache(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "chat.jsonl", _records(20))
    prepare_data(_data(tmp_path, path), tokenizer)
    assert prepare_data(_data(tmp_path, path, "data.seq_len=64"), tokenizer).built
    _write_jsonl(path, _records(21))
    assert len(prepare_data(_data(tmp_path, path), tokenizer).train) == 21
    tokenizer.chat_template = tokenizer.chat_template + " "
    try:
        assert prepare_data(_data(tmp_path, path), tokenizer).built
    finally:
        tokenizer.chat_template = tokenizer.chat_template[:-1]
    assert len(list((tmp_path / "cache").iterdir())) == 4


def test_parquet_arrow_and_save_to_disk_give_the_jsonl_samples(tmp_path, tokenizer):
    import datasets

    records = _records(30)
    jsonl = prepare_data(_data(tmp_path, _write_jsonl(tmp_path / "chat.jsonl", records)), tokenizer)
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "chat.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved_dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in (tmp_path / "chat.parquet", arrow, tmp_path / "saved", tmp_path / "saved_dict"):
        assert _tokens(prepare_data(_data(tmp_path, source), tokenizer).train) == _tokens(jsonl.train), source


def test_a_missing_split_of_a_saved_dataset_dict_names_the_splits(tmp_path, tokenizer):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(_records(3))}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(UserError, match=r"has no split 'validation' \(splits: train\); set data.split to one of"):
        prepare_data(_data(tmp_path, tmp_path / "d", "data.split=validation"), tokenizer)


def test_worker_processes_give_the_inline_samples_and_exact_error_lines(tmp_path, tokenizer, monkeypatch):
    path = _write_jsonl(tmp_path / "chat.jsonl", _records(400))
    inline = prepare_data(_data(tmp_path, path), tokenizer)
    monkeypatch.setattr(storage, "INLINE_BYTES", 0)  # this small file through 2 processes, 8 shards
    pooled = prepare_data(_data(tmp_path, path, "data.num_proc=2", f"data.cache_dir={tmp_path / 'pooled'}"), tokenizer)
    assert pooled.built and _tokens(pooled.train) == _tokens(inline.train)
    lines = path.read_text().splitlines()
    lines[350] = '{"messages": [{"role": "user", "content": "x"}, {"role": "assitant", "content": "y"}]}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"chat\.jsonl:351 has a message with the unknown role 'assitant'"):
        prepare_data(_data(tmp_path, path, "data.num_proc=2", f"data.cache_dir={tmp_path / 'bad'}"), tokenizer)
    assert list((tmp_path / "bad").iterdir()) == []  # the temporary build is gone; no cache to be read later


def test_a_half_written_cache_is_never_read(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "chat.jsonl", _records(10))
    data = _data(tmp_path, path)
    first = prepare_data(data, tokenizer)
    cache = next((tmp_path / "cache").iterdir())
    (cache / "info.json").unlink()  # as if killed before the rename: the directory is not a built cache
    os.rename(cache, cache.with_name(".tmp-" + cache.name))
    again = prepare_data(data, tokenizer)
    assert again.built and _tokens(again.train) == _tokens(first.train)


def test_hub_name_offline_is_one_line_naming_hf_hub_offline(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets
    import huggingface_hub

    # both libraries read the variables when imported (this process imported them already): as a fresh CLI sees them
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(UserError, match=r"cannot load the dataset 'nobody-here/no-such-set' \(split train\) from the "
                                        r"Hugging Face Hub .*HF_HUB_OFFLINE is set") as err:
        prepare_data(_data(tmp_path, "nobody-here/no-such-set"), tokenizer)
    assert "\n" not in str(err.value)


def test_validation_fraction_is_held_out_of_training(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "chat.jsonl", _records(100))
    data = prepare_data(_data(tmp_path, path, "data.eval_fraction=0.1"), tokenizer)
    assert (len(data.train), len(data.eval)) == (90, 10)
    assert not set(map(tuple, _tokens(data.train))) & set(map(tuple, _tokens(data.eval)))
