"""The finished output is verified (shard sizes, headers re-read from disk, index) before it is
moved into place; a failed verification is E506 and nothing appears at the output path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mergelang.io.writer import CheckpointWriter, OutputTensor, ShardLayout, WriterError, plan_shards
from mergelang.io.verify import verify_output


def tensors() -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((3, 4), float(i)) for i in range(6)}


def layout_of(ts: dict[str, torch.Tensor]) -> ShardLayout:
    return plan_shards([OutputTensor(n, tuple(t.shape), "float32") for n, t in ts.items()], 100)


def failing_finish(tmp_path: Path, damage, **writer_kw) -> WriterError:
    ts = tensors()
    layout = layout_of(ts)
    with pytest.raises(WriterError) as ei:
        with CheckpointWriter(tmp_path / "out", layout, **writer_kw) as w:
            for n, t in ts.items():
                w.write(n, t)
            damage(w, layout)
            w.finish()
    assert not (tmp_path / "out").exists()
    return ei.value


def test_good_output_verifies(tmp_path: Path) -> None:
    ts = tensors()
    layout = layout_of(ts)
    with CheckpointWriter(tmp_path / "out", layout) as w:
        for n, t in ts.items():
            w.write(n, t)
        w.finish()
    assert len(layout.shards) == 3
    assert verify_output(tmp_path / "out", layout) is None


def test_truncated_shard(tmp_path: Path) -> None:
    def damage(w: CheckpointWriter, layout: ShardLayout) -> None:
        os.truncate(w.tmp_dir / layout.shards[1].filename, layout.shards[1].size - 4)

    err = failing_finish(tmp_path, damage)
    assert err.code == "E506" and "bytes, expected" in str(err)
    assert [p.name for p in tmp_path.iterdir()] == []  # temporary folder removed


def test_corrupt_header_on_disk(tmp_path: Path) -> None:
    def damage(w: CheckpointWriter, layout: ShardLayout) -> None:
        with open(w.tmp_dir / layout.shards[0].filename, "r+b") as f:
            f.seek(8)
            f.write(b"#")

    err = failing_finish(tmp_path, damage)
    assert err.code == "E506" and "does not parse back" in str(err)


def test_wrong_index_and_stray_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ShardLayout.index

    def bad_index(self: ShardLayout) -> dict:
        out = real(self)
        out["weight_map"]["t0"] = self.shards[-1].filename
        return out

    monkeypatch.setattr(ShardLayout, "index", bad_index)
    err = failing_finish(tmp_path, lambda w, layout: None)
    assert err.code == "E506" and "does not hold it" in str(err)
    monkeypatch.undo()

    def stray(w: CheckpointWriter, layout: ShardLayout) -> None:
        (w.tmp_dir / "model-00009-of-00009.safetensors").write_bytes(b"x")

    err = failing_finish(tmp_path, stray)
    assert err.code == "E506" and "unexpected weight file" in str(err)


def test_resumable_writer_keeps_work_folder_on_failed_verification(tmp_path: Path) -> None:
    def damage(w: CheckpointWriter, layout: ShardLayout) -> None:
        os.truncate(w.tmp_dir / layout.shards[0].filename, 3)

    err = failing_finish(tmp_path, damage, fingerprint={"plan": "p", "inputs": "i"})
    assert err.code == "E506"
    assert [p.name for p in tmp_path.iterdir()] == [".out.mergelang-work"]
    # a resume notices the damaged shard, drops its journal entries and rewrites it
    ts = tensors()
    layout = layout_of(ts)
    with CheckpointWriter(tmp_path / "out", layout, fingerprint={"plan": "p", "inputs": "i"},
                          resume=True) as w:
        assert w.resumed == {n for s in layout.shards[1:] for n in s.offsets}
        for n, t in ts.items():
            if n not in w.resumed:
                w.write(n, t)
        w.finish()
    assert verify_output(tmp_path / "out", layout) is None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_two_runs_on_one_output_are_refused(tmp_path: Path) -> None:
    ts = tensors()
    layout = layout_of(ts)
    fp = {"plan": "p", "inputs": "i"}
    with CheckpointWriter(tmp_path / "out", layout, fingerprint=fp) as first:
        for resume in (False, True):
            with pytest.raises(WriterError) as ei:
                CheckpointWriter(tmp_path / "out", layout, fingerprint=fp, resume=resume)
            assert ei.value.code == "E507" and "another mergelang run" in str(ei.value)
        for n, t in ts.items():
            first.write(n, t)
        first.finish()
    assert verify_output(tmp_path / "out", layout) is None
