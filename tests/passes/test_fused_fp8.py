"""Fused CPU loops read block-scaled FP8 weights as stored (fuse.py `_read_stored`,
numba_codegen's `fp8:` inputs): the codes (one byte per element) and the block scales, decoded
in the loop as table[code] * scale, the same single float32 product the dequantizing source
computes. References: the same recipe with fusion off (`MERGELANG_FUSE=0`: the source
dequantizes, torch's kernels run op by op), bit for bit; and, for a linear merge, the
independent dequantize -> merge -> requantize of tests/sources/test_fp8.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.ir.ops import Op
from mergelang.passes.pipeline import Target, plan_for
from mergelang.runtime.kernels import numba_codegen, order
from tests.sources.test_fp8 import ref_dequant, ref_quant

BIG = "model.layers.0.mlp.down_proj.weight"  # 300 x 260: above fuse.MIN_ELEMENTS, edge blocks both ways
SHAPE = (300, 260)


def _quant(w: torch.Tensor, block: tuple[int, int], fmt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block amax / max scales (written independently of mergelang; any valid scales do)."""
    fmax = torch.finfo(fmt).max
    r, c = w.shape
    s = torch.zeros(-(-r // block[0]), -(-c // block[1]))
    q = torch.zeros(r, c)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            s[i, j] = blk.abs().max() / fmax
            if s[i, j] > 0:
                q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = blk / s[i, j]
    return q.to(fmt), s


def write(folder: Path, seed: int, scale: float, block=(128, 128), fmt=torch.float8_e4m3fn,
          specials: bool = False, scale_dtype=torch.float32) -> Path:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE, generator=g) * scale
    q, s = _quant(w, block, fmt)
    if specials:  # codes for -0, the smallest subnormals, the largest values and NaN
        codes = q.view(torch.uint8)
        codes[0, :8] = torch.tensor([0x80, 0x01, 0x81, 0x7E, 0xFE, 0x7F, 0x00, 0x08], dtype=torch.uint8)
    sd = {BIG: q, BIG + "_scale_inv": s.to(scale_dtype), "model.norm.weight": torch.randn(260, generator=g).to(torch.bfloat16)}
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v3", "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}))
    return folder


def write_bf16(folder: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file({BIG: torch.randn(SHAPE, generator=g).to(torch.bfloat16),
               "model.norm.weight": torch.randn(260, generator=g).to(torch.bfloat16)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "torch_dtype": "bfloat16"}))
    return folder


def _recipe(models: dict[str, Path], rule: str) -> str:
    decl = "".join(f'model {k} = "{p}"\n' for k, p in models.items())
    return decl + f"merge from {next(iter(models))} {{ \"*\" => {rule} }}\n"


def _run(monkeypatch, text: str, dtype: str | None = None, fuse: bool = True) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("MERGELANG_FUSE", "1" if fuse else "0")
    try:
        return ml.compile(text, dtype=dtype).evaluate()
    finally:
        monkeypatch.delenv("MERGELANG_FUSE")


def _stored_kinds(text: str) -> list[tuple[str, ...]]:
    """The input kinds of the fused steps that read FP8 as stored (and check their LOADs)."""
    r = ml.compile(text)
    plan = plan_for(r.compilation.plan, Target("cpu")).plan
    g = plan.graph
    kinds = []
    for s in plan.steps:
        n = g.node(s.nid)
        if n.op is Op.FUSED and any(k.startswith("fp8:") for k in n.attrs["inputs"]):
            kinds.append(n.attrs["inputs"])
            for a, k in zip(n.args, n.attrs["inputs"]):
                if k.startswith("fp8:"):
                    assert g.node(a).attrs["stored"] and g.node(a).type.dtype.startswith("float8")
                if k == "fp8scale":
                    assert g.node(a).attrs["tensor"] == BIG + "_scale_inv"
    quant = [g.node(s.nid).attrs for s in plan.steps if g.node(s.nid).op is Op.BLOCK_QUANT]
    assert quant and all(q.get("numba") for q in quant)  # FP8 output: numba_fp8's kernels
    assert {q.get("codes") for q in quant} == {None, "float8_e4m3fn"}  # the values part gives codes
    r.close()
    return kinds


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit (a NaN may carry another payload: fused loops' documented difference)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[x.element_size()]
    if not x.is_floating_point() or x.element_size() == 1:
        return torch.equal(x.view(bits), y.view(bits))
    nx, ny = torch.isnan(x), torch.isnan(y)
    return torch.equal(nx, ny) and torch.equal(x.view(bits)[~nx], y.view(bits)[~ny])


@pytest.fixture
def pair(tmp_path: Path) -> dict[str, Path]:
    # scales 10^4 apart: each model's codes must be decoded with its own scales
    return {"a": write(tmp_path / "a", 0, 1e-3), "b": write(tmp_path / "b", 1, 10.0)}


def test_linear_merge_reads_codes_and_matches_the_reference(pair, monkeypatch) -> None:
    text = _recipe(pair, "linear([a, b], weights = [0.7, 0.3])")
    assert _stored_kinds(text) == [("fp8:128:128", "fp8scale", "fp8:128:128", "fp8scale", "mscalar")]
    got = _run(monkeypatch, text)
    ra, rb = (load_file(str(p / "model.safetensors")) for p in pair.values())
    merged = 0.7 * ref_dequant(ra[BIG], ra[BIG + "_scale_inv"]) + 0.3 * ref_dequant(rb[BIG], rb[BIG + "_scale_inv"])
    q, s = ref_quant(merged)
    assert torch.equal(got[BIG + "_scale_inv"], s)
    assert torch.equal(got[BIG].view(torch.uint8), q.view(torch.uint8))


@pytest.mark.parametrize("rule", [
    "linear([a, b], weights = [0.7, 0.3])",
    "a + 0.5 * (b - a)",
    "ties(a, [b], density = 0.4)",  # a fused top-k selection recomputing b - a from the codes
    "where(abs(a) > abs(b), a, b * 2)",
])
@pytest.mark.parametrize("dtype", [None, "bfloat16", "float32"])
def test_fused_equals_unfused(pair, monkeypatch, rule, dtype) -> None:
    text = _recipe(pair, rule)
    assert _stored_kinds(text)
    fused, plain = _run(monkeypatch, text, dtype), _run(monkeypatch, text, dtype, fuse=False)
    assert set(fused) == set(plain)
    for k in plain:
        assert _same(fused[k], plain[k]), k


@pytest.mark.parametrize("case", ["blocks", "e5m2", "bf16", "specials", "bf16_scales"])
def test_other_formats_and_mixtures(tmp_path, monkeypatch, case) -> None:
    """Different block sizes in one loop (scales looked up per element), e5m2 codes, an FP8
    model with a bfloat16 one, codes for -0, subnormals, the largest values and NaN, scales
    stored as bfloat16."""
    a = write(tmp_path / "a", 0, 1.0, specials=case == "specials")
    b = {"blocks": lambda p: write(p, 1, 3.0, block=(64, 32)),
         "e5m2": lambda p: write(p, 1, 3.0, fmt=torch.float8_e5m2),
         "bf16": lambda p: write_bf16(p, 1),
         "specials": lambda p: write(p, 1, 3.0, specials=True),
         "bf16_scales": lambda p: write(p, 1, 3.0, scale_dtype=torch.bfloat16)}[case](tmp_path / "b")
    text = _recipe({"a": a, "b": b}, "a * 0.25 + b * 0.75")
    kinds = _stored_kinds(text)
    assert kinds and any(k.startswith("fp8:") for k in kinds[0])
    fused, plain = _run(monkeypatch, text, "float32"), _run(monkeypatch, text, "float32", fuse=False)
    for k in plain:
        assert _same(fused[k], plain[k]), k
    if case == "specials":
        assert torch.isnan(fused[BIG][0, 5])


@pytest.mark.parametrize("rule", ["a - b * 0.125", "ties(a, [b], density = 0.3)"])
def test_threads_cut_inside_blocks(pair, monkeypatch, rule) -> None:
    """A loop split over threads at element positions inside a block run decodes the same; a
    selection takes its split form (one part per thread; numba_topk.split_source)."""
    monkeypatch.setattr(numba_codegen, "PARALLEL_ELEMENTS", 1)
    monkeypatch.setattr(numba_codegen, "THREADS", 7)
    text = _recipe(pair, rule)
    with monkeypatch.context() as m:  # the selection must not fall back to the plain path
        m.setattr(order, "topk_mask_plain", lambda *a: pytest.fail("fused selection fell back"))
        fused = _run(monkeypatch, text, "float32")
    plain = _run(monkeypatch, text, "float32", fuse=False)
    assert _same(fused[BIG], plain[BIG])


def test_row_chunks_stay_dequantized(pair) -> None:
    """Row chunks (a memory budget) read dequantized rows: no stored FP8 read in the plan."""
    r = ml.compile(_recipe(pair, "a * 0.5 + b * 0.5"), dtype="float32")
    plan = plan_for(r.compilation.plan, Target("cpu", memory_budget=200_000)).plan
    loads = [plan.graph.node(s.nid) for s in plan.steps if plan.graph.node(s.nid).op is Op.LOAD]
    assert any(n.attrs.get("rows") for n in loads)
    assert not any(n.attrs.get("stored") for n in loads)
    r.close()


def test_trials_read_codes_through_held_models(pair, monkeypatch) -> None:
    """A tune trial holds each input in memory (search/trials.HeldSource): stored codes and
    scales are held and read from there, giving the compiled run's values."""
    from mergelang.compiler import compile_recipe
    from mergelang.diagnostics import SourceFile
    from mergelang.search.trials import TrialRunner

    text = _recipe(pair, "linear([a, b], weights = [w, 1 - w])").replace("merge", "param w = 0.5 in [0, 1]\nmerge")
    runner = TrialRunner(lambda runtime, fixed: compile_recipe(SourceFile("r.mrg", text), Path.cwd(), fixed,
                                                               runtime=runtime), ("w",))
    got = runner.run({"w": 0.7})
    want = _run(monkeypatch, _recipe(pair, "linear([a, b], weights = [0.7, 1 - 0.7])"))
    ra = load_file(str(pair["a"] / "model.safetensors"))
    assert torch.equal(got[BIG], ref_dequant(want[BIG], want[BIG + "_scale_inv"]))
    assert got[BIG].shape == ra[BIG].shape


def test_fp8_output_under_a_budget_says_why_it_is_not_chunked(pair) -> None:
    r = ml.compile(_recipe(pair, "a * 0.5 + b * 0.5"))
    planned = plan_for(r.compilation.plan, Target("cpu", memory_budget=200_000))
    assert any("quantized per block" in u.reason for u in planned.unchunked)
    r.close()


def test_gpu_plans_copy_codes_and_dequantize_on_the_device(pair) -> None:
    """A GPU plan reads FP8 weights as codes + scales and dequantizes them in a BLOCK_DEQUANT
    step (passes/fp8_reads.py); a CPU plan without fusion keeps the dequantizing read. The GPU
    plan, executed here on the CPU, gives the reference's bytes."""
    from mergelang.runtime.executor import execute

    text = _recipe(pair, "linear([a, b], weights = [0.7, 0.3])")
    r = ml.compile(text)
    cpu = plan_for(r.compilation.plan, Target("cpu", fuse=False)).plan
    assert not any(cpu.graph.node(s.nid).op is Op.BLOCK_DEQUANT for s in cpu.steps)
    plan = plan_for(r.compilation.plan, Target("cuda")).plan
    g = plan.graph
    deq = [g.node(s.nid) for s in plan.steps if g.node(s.nid).op is Op.BLOCK_DEQUANT]
    assert len(deq) == 2
    for n in deq:
        codes, scales = (g.node(a) for a in n.args)
        assert codes.type.dtype == "float8_e4m3fn" and codes.attrs["stored"]
        assert scales.attrs["tensor"] == BIG + "_scale_inv" and n.type.dtype == "float32"
    got: dict[str, torch.Tensor] = {}
    execute(plan, r.compilation.models, got.__setitem__, "cpu", pipelined=True)
    r.close()
    ra, rb = (load_file(str(p / "model.safetensors")) for p in pair.values())
    merged = 0.7 * ref_dequant(ra[BIG], ra[BIG + "_scale_inv"]) + 0.3 * ref_dequant(rb[BIG], rb[BIG + "_scale_inv"])
    q, s = ref_quant(merged)
    assert torch.equal(got[BIG + "_scale_inv"], s)
    assert torch.equal(got[BIG].view(torch.uint8), q.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_dequantizes_on_the_device_with_the_cpu_bytes(pair, tmp_path) -> None:
    text = _recipe(pair, "ties(a, [b], density = 0.3)")
    cpu = ml.compile(text).run(tmp_path / "cpu", device="cpu")
    gpu = ml.compile(text).run(tmp_path / "gpu", device="cuda")
    x, y = (load_file(str(next(p.glob("*.safetensors")))) for p in (cpu, gpu))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k].view(torch.uint8) if x[k].element_size() == 1 else x[k],
                           y[k].view(torch.uint8) if y[k].element_size() == 1 else y[k]), k
