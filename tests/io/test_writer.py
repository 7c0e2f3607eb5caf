"""Tests for mergelang.io.writer: shard planning and streaming checkpoint output."""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergelang.io.writer import (
    INDEX_NAME, CheckpointWriter, OutputTensor, ShardLayout, WriterError, plan_shards,
)


def spec(tensors: dict[str, torch.Tensor]) -> list[OutputTensor]:
    return [OutputTensor(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()]


def write_all(out: Path, tensors: dict[str, torch.Tensor], shard_size: int = 1 << 30,
              order: list[str] | None = None, **finish) -> ShardLayout:
    layout = plan_shards(spec(tensors), shard_size)
    with CheckpointWriter(out, layout) as w:
        for name in order or list(tensors):
            w.write(name, tensors[name])
        w.finish(**finish)
    return layout


def load_dir(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / INDEX_NAME).read_text())
    result: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        result.update(load_file(out / fname))
    return result


def leftovers(tmp_path: Path) -> list[str]:
    return [p.name for p in tmp_path.iterdir() if "mergelang-" in p.name]


def mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(4, generator=g).to(torch.float16),
        "d.i64": torch.arange(-5, 6, dtype=torch.int64).reshape(11, 1),
        "e.bool": torch.tensor([[True, False, True], [False, False, True]]),
        "f.scalar": torch.tensor(3.25),
        "g.empty": torch.zeros(0, 4),
    }


# ----------------------------------------------------------------------------- planning

def test_output_tensor_nbytes() -> None:
    assert OutputTensor("x", (3, 4), "bfloat16").nbytes == 24
    assert OutputTensor("x", (), "float32").nbytes == 4
    assert OutputTensor("x", (5,), "bool").nbytes == 5
    assert OutputTensor("x", (2, 0), "int64").nbytes == 0
    with pytest.raises(ValueError):
        OutputTensor("x", (1,), "complex64")


def test_plan_splits_greedily_in_order() -> None:
    ts = [OutputTensor(f"t{i}", (n,), "float32") for i, n in enumerate([10, 10, 5, 30, 1, 1])]
    layout = plan_shards(ts, shard_size=100)  # bytes: 40 40 20 | 120 | 4 4
    names = [[t.name for t in s.tensors] for s in layout.shards]
    assert names == [["t0", "t1", "t2"], ["t3"], ["t4", "t5"]]
    assert [s.filename for s in layout.shards] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for s in layout.shards:
        assert s.size == len(s.header) + sum(t.nbytes for t in s.tensors)
        assert len(s.header) % 8 == 0
        (n,) = struct.unpack("<Q", s.header[:8])
        assert n == len(s.header) - 8
        begin = len(s.header)
        for t in s.tensors:  # back to back, in the given order
            assert s.offsets[t.name] == (begin, begin + t.nbytes)
            begin += t.nbytes
        assert begin == s.size
    shard, b, e = layout.where("t4")
    assert shard.filename.startswith("model-00003") and e - b == 4
    assert layout.index() == {"metadata": {"total_size": 4 * 57},
                              "weight_map": {t.name: ("model-00001-of-00003.safetensors" if t.name in "t0 t1 t2"
                                                      else "model-00002-of-00003.safetensors" if t.name == "t3"
                                                      else "model-00003-of-00003.safetensors") for t in ts}}


def test_plan_single_shard_and_oversize() -> None:
    one = plan_shards([OutputTensor("x", (2,), "float32")], shard_size=10**9)
    assert [s.filename for s in one.shards] == ["model-00001-of-00001.safetensors"]
    big = plan_shards([OutputTensor("big", (100,), "float32"), OutputTensor("s", (1,), "float32")], 16)
    assert [[t.name for t in s.tensors] for s in big.shards] == [["big"], ["s"]]
    first_big = plan_shards([OutputTensor("s", (1,), "float32"), OutputTensor("big", (100,), "float32")], 16)
    assert [[t.name for t in s.tensors] for s in first_big.shards] == [["s"], ["big"]]
    exact = plan_shards([OutputTensor(f"t{i}", (2,), "float32") for i in range(4)], 16)
    assert [len(s.tensors) for s in exact.shards] == [2, 2]
    with pytest.raises(ValueError):
        plan_shards([OutputTensor("x", (1,), "float32")] * 2, 100)


# ----------------------------------------------------------------------------- writing

@pytest.mark.parametrize("shard_size", [1 << 30, 48])
def test_round_trip_exact(tmp_path: Path, shard_size: int) -> None:
    tensors = mixed()
    out = tmp_path / "out"
    layout = write_all(out, tensors, shard_size)
    assert (len(layout.shards) == 1) if shard_size > 1000 else (len(layout.shards) >= 3)
    loaded = load_dir(out)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["weight_map"] == {n: layout.where(n)[0].filename for n in tensors}
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_NAME, "mergelang_manifest.json",
                                                            *(s.filename for s in layout.shards)])
    assert leftovers(tmp_path) == []


def test_files_parse_with_safe_open(tmp_path: Path) -> None:
    tensors = mixed()
    layout = write_all(tmp_path / "out", tensors, 64)
    for s in layout.shards:
        path = tmp_path / "out" / s.filename
        data = path.read_bytes()
        assert len(data) == s.size and data[: len(s.header)] == s.header
        (n,) = struct.unpack("<Q", data[:8])
        assert (8 + n) % 8 == 0
        header = json.loads(data[8 : 8 + n])
        assert header["__metadata__"] == {"format": "pt"}
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert list(f.keys()) == sorted(t.name for t in s.tensors)
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), tensors[name])


def test_reverse_order_and_threads(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {f"layer.{i}.w": torch.randn(17, 9, generator=g).to(torch.bfloat16) for i in range(40)}
    write_all(tmp_path / "rev", tensors, 1000, order=list(reversed(tensors)))
    assert all(torch.equal(load_dir(tmp_path / "rev")[n], t) for n, t in tensors.items())

    layout = plan_shards(spec(tensors), 1000)
    names = list(tensors)
    with CheckpointWriter(tmp_path / "thr", layout) as w:
        threads = [threading.Thread(target=lambda k=k: [w.write(n, tensors[n]) for n in names[k::4]])
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        w.finish()
    loaded = load_dir(tmp_path / "thr")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_write_checks_shape_dtype_and_duplicates(tmp_path: Path) -> None:
    layout = plan_shards([OutputTensor("x", (2, 3), "float32")], 100)
    with CheckpointWriter(tmp_path / "out", layout) as w:
        with pytest.raises(ValueError):
            w.write("x", torch.zeros(3, 2))
        with pytest.raises(ValueError):
            w.write("x", torch.zeros(2, 3, dtype=torch.float16))
        with pytest.raises(ValueError):
            w.write("nope", torch.zeros(2, 3))
        w.write("x", torch.ones(2, 3).t().contiguous().t())  # non-contiguous input is fine
        with pytest.raises(ValueError):
            w.write("x", torch.ones(2, 3))
        w.finish()
    assert torch.equal(load_dir(tmp_path / "out")["x"], torch.ones(2, 3))


def test_existing_output(tmp_path: Path) -> None:
    tensors = {"x": torch.arange(4.0)}
    layout = plan_shards(spec(tensors), 100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(WriterError) as ei:
        CheckpointWriter(out, layout)
    assert ei.value.code == "E403" and "by hand" in (ei.value.help or "")
    with pytest.raises(WriterError) as ei:  # not a mergelang output: --force does not help
        CheckpointWriter(out, layout, force=True)
    assert ei.value.code == "E403" and "--force" not in (ei.value.help or "")
    assert (out / "old.txt").exists() and leftovers(tmp_path) == []

    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(WriterError) as ei:
        CheckpointWriter(afile, layout, force=True)
    assert ei.value.code == "E403"

    (out / "old.txt").unlink()
    write_all(out, {"x": torch.arange(4.0) + 1}, 100)  # an empty folder is written into
    with pytest.raises(WriterError) as ei:  # its own earlier output: only with force
        CheckpointWriter(out, layout)
    assert ei.value.code == "E403" and "--force" in (ei.value.help or "")
    with CheckpointWriter(out, layout, force=True) as w:
        w.write("x", tensors["x"])
        assert (out / "mergelang_manifest.json").exists()  # untouched until finish
        w.finish()
    assert not (out / "old.txt").exists()
    assert torch.equal(load_dir(out)["x"], tensors["x"])
    assert leftovers(tmp_path) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    write_all(empty, tensors)  # an existing empty folder needs no --force
    assert torch.equal(load_dir(empty)["x"], tensors["x"])


def test_abort_and_exception_leave_nothing(tmp_path: Path) -> None:
    tensors = mixed()
    layout = plan_shards(spec(tensors), 64)
    w = CheckpointWriter(tmp_path / "out", layout)
    assert w.tmp_dir.exists() and w.tmp_dir.parent == tmp_path
    assert w.tmp_dir.name.startswith(".out.mergelang-tmp-")
    w.write("a.f32", tensors["a.f32"])
    w.abort()
    w.abort()  # idempotent
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "out", layout) as w:
            w.write("a.f32", tensors["a.f32"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with CheckpointWriter(tmp_path / "out", layout) as w:  # leaving without finish()
        pass
    assert list(tmp_path.iterdir()) == []


def test_missing_tensor_is_e502(tmp_path: Path) -> None:
    tensors = mixed()
    layout = plan_shards(spec(tensors), 64)
    with pytest.raises(WriterError) as ei:
        with CheckpointWriter(tmp_path / "out", layout) as w:
            for name in list(tensors)[:-2]:
                w.write(name, tensors[name])
            w.finish()
    assert ei.value.code == "E502"
    assert "tensors not written" in str(ei.value) and "f.scalar" in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    calls = []

    def short_pwrite(fd: int, data: bytes, offset: int) -> int:
        calls.append(offset)
        return real(fd, memoryview(data)[:3], offset)

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    tensors = mixed()
    write_all(tmp_path / "out", tensors, 64)
    monkeypatch.undo()
    assert len(calls) > 100
    loaded = load_dir(tmp_path / "out")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_disk_full_is_e502(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = {"x": torch.ones(8)}
    layout = plan_shards(spec(tensors), 100)
    with pytest.raises(WriterError) as ei:
        with CheckpointWriter(tmp_path / "out", layout) as w:
            def full(*args: object) -> int:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(os, "pwrite", full)
            w.write("x", tensors["x"])
    assert ei.value.code == "E502" and "No space left on device" in str(ei.value)
    assert layout.shards[0].filename in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_location_is_e502(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(WriterError) as ei:
        CheckpointWriter(blocker / "out", plan_shards([OutputTensor("x", (1,), "float32")], 100))
    assert ei.value.code == "E502" and str(blocker) in str(ei.value)


@pytest.mark.parametrize("with_dtype_key", [False, True])
def test_config_and_side_files(tmp_path: Path, with_dtype_key: bool) -> None:
    src = tmp_path / "base"
    (src / "sub").mkdir(parents=True)
    cfg = {"model_type": "llama", "torch_dtype": "float32", "hidden_size": 8}
    if with_dtype_key:
        cfg["dtype"] = "float32"
    (src / "config.json").write_text(json.dumps(cfg))
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"]:
        (src / name).write_text(json.dumps({"content of": name}))
    (src / "tokenizer.model").write_text("content of tokenizer.model")
    for name in ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json", "model.onnx", "weights.gguf", "mergelang_recipe.mrg"]:
        (src / name).write_text("weights")
    (src / "sub" / "nested.txt").write_text("nested")

    out = tmp_path / "out"
    write_all(out, {"x": torch.zeros(2, dtype=torch.bfloat16)}, config_from=src, dtype="bfloat16",
              recipe_text="merge base\n", extra_files={"README.md": "# merged\n"})
    new_cfg = json.loads((out / "config.json").read_text())
    assert new_cfg["torch_dtype"] == "bfloat16" and new_cfg["hidden_size"] == 8
    assert ("dtype" in new_cfg) == with_dtype_key
    if with_dtype_key:
        assert new_cfg["dtype"] == "bfloat16"
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"]:
        assert json.loads((out / name).read_text()) == {"content of": name}
    assert (out / "tokenizer.model").read_text() == "content of tokenizer.model"
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json", "tokenizer.model", "mergelang_recipe.mrg", "README.md",
                     INDEX_NAME, "model-00001-of-00001.safetensors", "mergelang_manifest.json"}
    assert json.loads((out / "mergelang_manifest.json").read_text())["files"] == sorted(names)
    assert (out / "mergelang_recipe.mrg").read_text() == "merge base\n"
    assert (out / "README.md").read_text() == "# merged\n"
    assert json.loads((out / INDEX_NAME).read_text())["weight_map"] == {"x": "model-00001-of-00001.safetensors"}


def test_no_config_json_is_not_invented(tmp_path: Path) -> None:
    src = tmp_path / "base"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    write_all(out, {"x": torch.zeros(1)}, config_from=src, dtype="float16")
    assert not (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_transformers_tiny_llama_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    src = tmp_path / "src"
    config.save_pretrained(src)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    out = tmp_path / "merged"
    layout = write_all(out, state, shard_size=16 * 1024, order=list(reversed(state)),
                       config_from=src, dtype="float32")
    assert len(layout.shards) >= 3

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        actual = loaded(ids).logits
    assert torch.equal(expected, actual)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
