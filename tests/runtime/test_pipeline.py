"""The overlapped executor (mergelang/pipeline.py) and the tensor readers.

* bit-identical results to the sequential interpreter, for every lookahead (0 = one tensor in
  flight, tiny, default) and 1 or 2 reader threads, outputs reaching the sink in output order;
* exceptions in a reader, in the sink (writer thread) and in the compute loop reach the caller
  unchanged, and no pipeline thread is left running;
* the lookahead cap holds (prefetched + pending-write bytes stay within it, plus at most one
  tensor larger than the cap and one output waiting for the writer);
* `SafetensorsSource.load`/`load_as` (per-tensor mmap, pread) return what safetensors returns.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergelang as ml
from mergelang.io import checkpoint
from mergelang.io.checkpoint import CheckpointError
from mergelang.io.locate import open_model
from mergelang.runtime.executor import compute, execute, resolve_device, run_plan
from mergelang.runtime.pipeline import Pipeline

SHAPES = {"embed.weight": (64, 16), "layers.0.q.weight": (16, 16), "layers.0.norm.weight": (16,),
          "layers.1.q.weight": (16, 16), "layers.1.mlp.weight": (48, 16), "scale": (),
          "steps": (3,)}


def _models(tmp_path: Path) -> dict[str, Path]:
    gen = torch.Generator().manual_seed(0)
    paths = {}
    for i, name in enumerate(("base", "a", "b")):
        sd = {}
        for t, shape in SHAPES.items():
            if t == "steps":
                sd[t] = torch.tensor([1, 2, 3 + i], dtype=torch.int64)
            else:
                sd[t] = (torch.randn(shape, generator=gen) * (1 + i)).to(torch.bfloat16)
        folder = tmp_path / name
        folder.mkdir()
        save_file(sd, folder / "model.safetensors")
        paths[name] = folder
    return paths


RECIPES = {
    "ties": 'merge from base {\n "steps" => base\n "*" => ties(base, [a, b], density = 0.5)\n}\n',
    "linear": 'merge from base {\n "steps" => base\n "*" => linear([base, a, b], weights = [1, 2, 3])\n}\n',
    "slerp": 'merge from base {\n "steps" => base\n "*" => slerp(a, b, t = 0.3)\n}\n',
}


def _recipe(tmp_path: Path, method: str) -> str:
    paths = _models(tmp_path)
    return "".join(f'model {k} = "{v}"\n' for k, v in paths.items()) + RECIPES[method]


def _no_pipeline_threads() -> bool:
    return not any(t.name.startswith("mergelang-") and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("method", sorted(RECIPES))
@pytest.mark.parametrize("lookahead,readers", [(0, 1), (1000, 1), (None, 1), (0, 2), (None, 2)])
def test_bit_identical_to_sequential(tmp_path, method, lookahead, readers):
    r = ml.compile(_recipe(tmp_path, method))
    c = r.compilation
    expected: dict[str, torch.Tensor] = {}
    execute(c.plan, c.models, expected.__setitem__, pipelined=False)
    got: dict[str, torch.Tensor] = {}
    budget = None if lookahead is None else c.plan.peak_bytes + lookahead
    run_plan(c.plan, c.models, got.__setitem__, memory_budget=budget, readers=readers)
    assert list(got) == list(expected)  # the sink sees outputs in output order
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        assert torch.equal(got[name], expected[name]), name
    assert _no_pipeline_threads()
    r.close()


def test_run_to_disk_is_identical(tmp_path):
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    r = ml.compile(_recipe(tmp_path, "ties"))
    seq = tensors(r.run(tmp_path / "seq", device="cpu", pipelined=False))
    par = tensors(r.run(tmp_path / "par", device="cpu", memory_budget="1MB"))
    assert seq
    assert seq.keys() == par.keys() and all(torch.equal(seq[k], par[k]) for k in seq)
    r.close()


class Boom(Exception):
    pass


def test_reader_exception_propagates(tmp_path):
    r = ml.compile(_recipe(tmp_path, "ties"))
    c = r.compilation
    src = c.models["b"]
    original = src.load_as

    def load_as(name, dtype=None, **kw):
        if name == "layers.1.q.weight":
            raise Boom(name)
        return original(name, dtype, **kw)

    src.load_as = load_as  # type: ignore[method-assign]
    seen: list[str] = []
    with pytest.raises(Boom, match="layers.1.q.weight"):
        execute(c.plan, c.models, lambda n, t: seen.append(n))
    assert "layers.1.q.weight" not in seen
    assert _no_pipeline_threads()
    r.close()


def test_sink_exception_propagates(tmp_path):
    r = ml.compile(_recipe(tmp_path, "linear"))
    c = r.compilation

    def sink(name, t):
        if name == "layers.0.norm.weight":
            raise Boom("disk full")

    with pytest.raises(Boom, match="disk full"):
        execute(c.plan, c.models, sink)
    assert _no_pipeline_threads()
    r.close()


def test_compute_exception_stops_threads(tmp_path):
    recipe = _recipe(tmp_path, "linear").replace(
        '"*" => linear', '"layers.1.*" => checked(base, max(base, over = "tensor") > 1e9, "too small")\n "*" => linear')
    r = ml.compile(recipe)
    with pytest.raises(ml.MergelangError) as info:
        r.evaluate()
    assert info.value.diagnostics[0].code == "E501"
    assert _no_pipeline_threads()
    r.close()


@pytest.mark.parametrize("lookahead", [0, 600, 5000])
def test_lookahead_cap_holds(tmp_path, lookahead):
    r = ml.compile(_recipe(tmp_path, "ties"))
    c = r.compilation
    got: dict[str, torch.Tensor] = {}
    with Pipeline(c.plan, c.models, got.__setitem__, torch.device("cpu"), None, lookahead, 2) as pipe:
        compute(c.plan, pipe.take, pipe.put, torch.device("cpu"))
    largest_in = max(pipe.size.values())
    largest_out = max(t.numel() * t.element_size() for t in got.values())
    # documented bound: the cap, or one tensor larger than it, plus one output (the compute
    # loop never waits for bytes that only it can release)
    assert pipe.budget.peak <= max(lookahead, largest_in) + largest_out
    assert pipe.budget.used == 0 and pipe.budget.pending_writes == 0
    r.close()


@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_readers_match_safetensors(tmp_path, monkeypatch, reader):
    from safetensors.torch import load_file

    paths = _models(tmp_path)
    expected = load_file(paths["base"] / "model.safetensors")
    monkeypatch.setattr(checkpoint, "READER", reader)
    src = open_model("base", paths["base"])
    for n, want in expected.items():
        for got in (src.load(n), src.load_as(n), src.load_as(n, want.dtype)):
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        up = src.load_as(n, torch.float32)
        assert up.dtype == torch.float32 and torch.equal(up, want.to(torch.float32))
    src.close()


@pytest.mark.parametrize("reader", ["mmap", "pread"])
def test_reader_truncated_file(tmp_path, monkeypatch, reader):
    monkeypatch.setattr(checkpoint, "READER", reader)
    paths = _models(tmp_path)
    src = open_model("base", paths["base"])
    f = paths["base"] / "model.safetensors"
    with open(f, "r+b") as h:  # truncated after the header was read
        h.truncate(f.stat().st_size - 8)
    last = max(src.tensors().values(), key=lambda i: i.end)
    with pytest.raises(CheckpointError, match="truncated"):
        src.load_as(last.name, torch.float32)
    src.close()


def test_device_auto_is_cpu_without_cuda():
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipeline_matches_cpu(tmp_path):  # pragma: no cover - no GPU in CI
    r = ml.compile(_recipe(tmp_path, "ties"))
    cpu = r.evaluate("cpu")
    gpu = r.evaluate("cuda")
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-6)
    r.close()


def test_cli_memory_budget(tmp_path):
    from click.testing import CliRunner

    from mergelang.cli import main

    recipe = tmp_path / "ties.mrg"
    recipe.write_text(_recipe(tmp_path, "ties"))
    runner = CliRunner()
    tight = runner.invoke(main, ["run", str(recipe), "-o", str(tmp_path / "tight"), "--quiet",
                                 "--device", "cpu", "--memory-budget", "1KB"])
    assert tight.exit_code == 0, tight.output
    assert "than the memory budget (1000 B)" in tight.output and "cannot be split into row chunks" in tight.output
    assert "`embed.weight`" in tight.output and "topk_mask over tensor" in tight.output
    assert tight.output.count("warning:") == 1  # one summary line, not one per tensor
    roomy = runner.invoke(main, ["run", str(recipe), "-o", str(tmp_path / "roomy"), "--quiet",
                                 "--device", "cpu", "--memory-budget", "1GB"])
    assert roomy.exit_code == 0 and "warning" not in roomy.output.replace("warning[W004]", "")
    for f in (tmp_path / "tight").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "roomy" / f.name).read_bytes()
    bad = runner.invoke(main, ["run", str(recipe), "-o", str(tmp_path / "x"), "--memory-budget", "lots"])
    assert bad.exit_code == 2
