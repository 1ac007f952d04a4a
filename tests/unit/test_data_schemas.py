"""Every schema the data pipeline reads renders to the tokens and loss mask of its chat (or prompt/completion)
equivalent; a record that fits none, or an unknown speaker, is a one-line error naming its file and line."""

from __future__ import annotations

import json

import pytest

from trainer.build import load_tokenizer
from trainer.config import load_recipe
from trainer.data import render_record
from trainer.data.prepare import prepare_data
from trainer.errors import UserError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5."}, {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8."}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_recipe("tiny-moe").model)


def _same(a, b):
    assert a.input_ids == b.input_ids and list(map(bool, a.loss_mask)) == list(map(bool, b.loss_mask))


def test_sharegpt_conversations_render_as_the_chat_they_map_to(tokenizer):
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    record = {"conversations": [{"from": speakers[m["role"]], "value": m["content"]} for m in CHAT]}
    _same(render_record(record, tokenizer), render_record({"messages": CHAT}, tokenizer))


def test_content_as_a_list_of_text_parts_renders_as_the_joined_string(tokenizer):
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}]}
             for m in CHAT]
    _same(render_record({"messages": parts}, tokenizer), render_record({"messages": CHAT}, tokenizer))


def test_alpaca_is_one_user_turn_of_instruction_and_input_then_the_output(tokenizer):
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "Be brief."}
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
            {"role": "assistant", "content": "5"}]
    _same(render_record(record, tokenizer), render_record({"messages": chat}, tokenizer))


def test_plain_text_trains_on_every_token_and_ends_with_eos(tokenizer):
    sample = render_record({"text": "the router learns a balanced load"}, tokenizer)
    assert sample.input_ids[-1] == tokenizer.eos_token_id
    assert all(sample.loss_mask) and len(sample) > 3


def test_column_mapping_renames_a_dataset_own_columns(tokenizer):
    mapped = render_record({"question": "Q: 2 + 2?", "answer": " 4"}, tokenizer,
                           columns={"prompt": "question", "completion": "answer"})
    _same(mapped, render_record({"prompt": "Q: 2 + 2?", "completion": " 4"}, tokenizer))


def _prepare(tmp_path, tokenizer, records, **data):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    overrides = [f"data.train_path={path}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=128",
                 "data.format=auto"]
    recipe = load_recipe("tiny-moe", overrides + [f"data.{k}={v}" for k, v in data.items()])
    return prepare_data(recipe.data, tokenizer)


def test_unknown_sharegpt_speaker_names_file_line_and_turn(tmp_path, tokenizer):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    with pytest.raises(UserError, match=r"data\.jsonl:2 has a turn from the unknown speaker 'bot' \(turn 2\); "
                                        r"use one of human, user, gpt"):
        _prepare(tmp_path, tokenizer, [good, bad])
    assert not any((tmp_path / "cache").iterdir())  # nothing half-built is left to be read later


def test_a_non_text_content_part_names_file_and_line(tmp_path, tokenizer):
    image = {"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                          {"role": "assistant", "content": "a cat"}]}
    with pytest.raises(UserError, match=r"data\.jsonl:1 has a content part of type 'image'"):
        _prepare(tmp_path, tokenizer, [image])


def test_mixed_schemas_in_one_file_are_each_detected(tmp_path, tokenizer):
    records = [{"messages": CHAT}, {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
               {"instruction": "Say hi.", "output": "hi"}, {"prompt": "Q:", "completion": " A"}, {"text": "plain"}]
    data = _prepare(tmp_path, tokenizer, records)
    assert len(data.train) == 5
    for i, record in enumerate(records):
        _same(data.train[i], render_record(record, tokenizer))
