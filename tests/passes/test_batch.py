"""Batching (passes/batch.py, runtime/kernels/batched.py): the batched plan gives the unbatched
plan's bytes.

The reference is the same recipe run without batching (the CPU default: fused loops; and with
fusion off: torch's kernels one op at a time). Batching is forced on the CPU with
MERGELANG_BATCH=1. The checkpoints are Llama-shaped and tiny: several layers whose projections
share shapes, bf16 inputs, written to tmp_path and merged to a folder, compared file by file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.ir.graph import verify
from mergelang.ir.ops import Op
from mergelang.passes.batch import batch_plan
from mergelang.passes.pipeline import Target, plan_for
from mergelang.passes.plan import format_plan
from mergelang.runtime.kernels import batched
from mergelang.runtime.kernels.order import topk_mask_rows

METHODS = {
    "linear": "linear([base, a, b], weights = [0.5, 0.3, 0.2])",
    "task_arithmetic": "task_arithmetic(base, [a, b], lambda = 0.7)",
    "ties": "ties(base, [a, b], weights = [1, 0.5], density = 0.4)",
    "dare_ties": "dare_ties(base, [a, b], density = 0.6, seed = 7)",
    "della": "della(base, [a, b], density = 0.5, epsilon = 0.1, seed = 3)",
    "breadcrumbs": "breadcrumbs(base, [a, b], density = 0.8, gamma = 0.05)",
    "slerp": "slerp(a, b, t = 0.3)",
}


def llama_tensors(seed: int, layers: int = 3, hidden: int = 16, inter: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(40, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (8, hidden)),
                            ("self_attn.v_proj", (8, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))):
            sd[p + name + ".weight"] = torch.randn(shape, generator=g) * 0.1
        sd[p + "input_layernorm.weight"] = 1 + 0.01 * torch.randn(hidden, generator=g)
    sd["model.norm.weight"] = torch.ones(hidden)
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch")
    base = llama_tensors(0)
    for k, name in enumerate(("base", "a", "b")):
        (root / name).mkdir()
        sd = base if k == 0 else {n: (v.float() + 0.02 * llama_tensors(k)[n].float()).to(torch.bfloat16)
                                   for n, v in base.items()}
        save_file(sd, str(root / name / "model.safetensors"))
    return root


def _recipe(root: Path, expr: str) -> Path:
    lines = [f'model {m} = "{root / m}"' for m in ("base", "a", "b")]
    lines.append(f'merge from base {{\n    "*norm*" => base\n    "*" => {expr}\n}}\n')
    path = root / "r.mrg"
    path.write_text("\n".join(lines))
    return path


def _run(root: Path, expr: str, out: Path, monkeypatch, **env: str) -> dict[str, torch.Tensor]:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ml.compile(str(_recipe(root, expr))).run(str(out))
    for k in env:
        monkeypatch.delenv(k)
    return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.suffix == ".safetensors"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_batched_plan_gives_the_same_bytes(models, tmp_path, monkeypatch, method):
    expr = METHODS[method]
    before = dict(batched.COUNTS)
    got = _run(models, expr, tmp_path / "batched", monkeypatch, MERGELANG_BATCH="1")
    assert batched.COUNTS["batched"] > before["batched"], "nothing ran batched"
    plain = _run(models, expr, tmp_path / "plain", monkeypatch, MERGELANG_BATCH="0", MERGELANG_FUSE="0")
    fused = _run(models, expr, tmp_path / "fused", monkeypatch, MERGELANG_BATCH="0")
    assert got and got == plain == fused
    sd = {}
    for name in got:
        sd.update(load_file(str(tmp_path / "batched" / name)))
    assert len(sd) == len(llama_tensors(0))


def _plan(models: Path, expr: str):
    return ml.compile(str(_recipe(models, expr))).compilation.plan


def test_batching_is_opt_in_on_every_target(models, monkeypatch):
    monkeypatch.delenv("MERGELANG_BATCH", raising=False)
    plan = _plan(models, METHODS["ties"])
    for dev in ("cuda", "cpu"):  # not measured on a GPU yet: nothing batched by default
        default = plan_for(plan, Target(dev, fuse=False)).plan
        assert Op.BATCH not in {default.graph.node(s.nid).op for s in default.steps}
    monkeypatch.setenv("MERGELANG_BATCH", "1")
    cuda = plan_for(plan, Target("cuda")).plan
    verify(cuda.graph)
    ops = [cuda.graph.node(s.nid).op for s in cuda.steps]
    # q/o (16x16), k/v (8x16), gate/up (24x16), down (16x24): four groups over the 3 layers;
    # the embedding is alone
    assert ops.count(Op.BATCH) == 4 and ops.count(Op.UNBATCH) == 7 * 3
    monkeypatch.setenv("MERGELANG_BATCH", "0")
    off = plan_for(plan, Target("cuda")).plan
    assert Op.BATCH not in {off.graph.node(s.nid).op for s in off.steps}


def test_emit_plan_shows_the_batched_steps(models, monkeypatch):
    """The golden text of a batched plan for a CUDA target (tests/golden/emit/batch_ties.plan)."""
    monkeypatch.setenv("MERGELANG_BATCH", "1")
    text = format_plan(plan_for(_plan(models, METHODS["ties"]), Target("cuda")).plan)
    golden = Path(__file__).resolve().parents[1] / "golden" / "emit" / "batch_ties.plan"
    text = text.replace(str(models), "<DIR>")
    if os.environ.get("MERGELANG_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert "batch %" in text and "tensors=6 loads_each=3 ops=<stack sub abs topk_mask where mul sign" in text


def test_budget_limits_the_batch(models):
    plan = _plan(models, METHODS["linear"])
    free = batch_plan(plan)
    tight = batch_plan(plan, budget=plan.peak_bytes)
    assert free.peak_bytes > plan.peak_bytes
    assert tight.peak_bytes <= plan.peak_bytes
    widths = [tight.graph.node(s.nid).attrs["batch"] for s in tight.steps
              if tight.graph.node(s.nid).op is Op.BATCH]
    assert all(w < 6 for w in widths)


@pytest.mark.parametrize("ks", [[3, 3, 3, 3], [0, 5, 12, 1], [12, 6, 6, 2]])
def test_topk_rows_batched_matches_row_by_row(ks):
    """The GPU form of the batched top-k (no host sync per row) against the row-by-row kernel,
    with many ties at the threshold."""
    x = torch.tensor([[1., 2, 2, 2, 0, 5, 2, 2, 1, 1, 3, 2]] * 4) * torch.tensor([[1.], [1.], [-1.], [2.]])
    got = batched.topk_mask_rows_batched(x, ks)
    want = torch.stack([topk_mask_rows(x[i:i + 1], k)[0] for i, k in enumerate(ks)])
    assert torch.equal(got, want)


def test_emit_plan_with_batching_forced_shows_it(models, monkeypatch):
    """`MERGELANG_BATCH=1 mergelang compile R --emit plan`: the CPU plan, batched as on a GPU."""
    recipe = ml.compile(str(_recipe(models, METHODS["linear"])))
    monkeypatch.setenv("MERGELANG_BATCH", "1")
    assert "tensors=6 loads_each=3 ops=<stack mul reduce cast>" in recipe.emit("plan")
    monkeypatch.delenv("MERGELANG_BATCH")
    assert "batch %" not in recipe.emit("plan")


def test_float64_plans_are_not_batched(models, monkeypatch):
    monkeypatch.setenv("MERGELANG_BATCH", "1")
    plan = _plan(models, METHODS["linear"])
    plan.graph.graph["compute_dtype"] = "float64"
    try:
        out = plan_for(plan, Target("cuda")).plan
        assert Op.BATCH not in {out.graph.node(s.nid).op for s in out.steps}
    finally:
        plan.graph.graph["compute_dtype"] = "float32"
