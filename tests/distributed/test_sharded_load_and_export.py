"""A model loaded shard by shard under EP=2 x FSDP=2 computes what one process computes, and its export is
byte-for-byte the single-process `save_pretrained` output (sharded and single-file layouts)."""

from __future__ import annotations

import pytest

import ep_workers
import tiny_configs
from checkpoint_files import file_bytes as _files
from checkpoint_files import save_single_process_exports
from harness import run_ranks

pytestmark = pytest.mark.distributed


def test_ep2_x_fsdp2_load_is_exact_and_export_equals_single_process_export_bit_for_bit(tmp_path):
    save_single_process_exports(tiny_configs.qwen3_moe(), str(tmp_path))

    results = run_ranks(ep_workers.export_matches_single_process, 4, str(tmp_path), {"ep_size": 2}, timeout=120)

    for result in results:  # loading read every rank's shard correctly: the forward is the single-process one
        assert result["loss"] == pytest.approx(result["ref_loss"], rel=1e-6)
    expected, written = _files(tmp_path / "single"), _files(tmp_path / "sharded")
    assert sorted(written) == sorted(expected)
    assert any(name.endswith(".index.json") for name in written)
    for name in expected:
        assert written[name] == expected[name], name
    assert _files(tmp_path / "sharded_single_file") == _files(tmp_path / "single_file")
