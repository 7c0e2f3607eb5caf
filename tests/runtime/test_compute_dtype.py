"""option compute_dtype = "float64" / `run --compute-dtype`: the merge's arithmetic in float64,
checked against independent float64 torch computations; the default (float32) unchanged, byte
for byte, against digests taken with the code before the option existed (commit 4a62a45)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.cli import main as cli_main

HEAD = 'model base = "x"\nmodel a = "x"\nmodel b = "x"\n'


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 9, generator=g), "b": torch.randn(9, generator=g)}


BASE, A, B = _sd(0), _sd(1), _sd(2)


def _merge(rule: str, compute: str | None, **models) -> dict[str, torch.Tensor]:
    opt = f'option compute_dtype = "{compute}"\n' if compute else ""
    src = HEAD + opt + 'option dtype = "float64"\nmerge from base { "*" => ' + rule + " }\n"
    return ml.compile(src, **(models or {"base": BASE, "a": A, "b": B})).evaluate()


def ties64(base, models, weights, density):
    """mergekit's TIES (magnitude top-k per model, ties: lowest index first; weighted sign
    election; weighted disjoint mean), in float64."""
    b = base.double()
    tvs = [m.double() - b for m in models]
    k = int(density * b.numel())
    trimmed = []
    for t in tvs:
        order = torch.sort(t.abs().reshape(-1), descending=True, stable=True).indices
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[order[:k]] = True
        trimmed.append(torch.where(keep.reshape(t.shape), t, 0.0))
    w = [wi * t for wi, t in zip(weights, trimmed)]
    elected = torch.where(sum(w) >= 0, 1.0, -1.0)
    masks = [torch.sign(x) == elected for x in w]
    mixed = sum(torch.where(m, x, 0.0) for m, x in zip(masks, w))
    div = sum(torch.where(m, torch.tensor(wi, dtype=torch.float64), 0.0) for m, wi in zip(masks, weights))
    div = torch.where(div == 0, 1.0, div)
    return b + mixed / div


def test_float64_ties_equals_a_float64_torch_computation() -> None:
    rule = "ties(base, [a, b], weights = [0.3, 0.7], density = 0.5)"
    out = _merge(rule, "float64")
    f32 = _merge(rule, None)
    for k in BASE:
        want = ties64(BASE[k], [A[k], B[k]], [0.3, 0.7], 0.5)
        assert out[k].dtype == torch.float64
        torch.testing.assert_close(out[k], want, rtol=1e-14, atol=1e-15)
        assert float((f32[k] - want).abs().max()) > 1e-9  # float32 compute is visibly further


def test_float64_slerp_of_nearly_parallel_tensors() -> None:
    """slerp where the angle is small (d just below mergekit's 0.9995 threshold): the float64
    formula, each step in float64 (constants too: t = 0.3 is not rounded to float32)."""
    g = torch.Generator().manual_seed(7)
    a = {"w": torch.randn(64, generator=g)}
    b = {"w": a["w"] + 0.04 * torch.randn(64, generator=g)}
    out = _merge("slerp(a, b, t = 0.3)", "float64", base=a, a=a, b=b)["w"]
    x, y, t = a["w"].double(), b["w"].double(), 0.3
    d = torch.dot(x / x.norm(), y / y.norm())
    assert 0.99 < float(d) < 0.9995
    theta = torch.acos(d)
    want = torch.sin((1 - t) * theta) / torch.sin(theta) * x + torch.sin(t * theta) / torch.sin(theta) * y
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_float64_model_wide_statistic() -> None:
    """A statistics pass (model_sum) feeds float64 values: the sum of a's squares over both
    tensors, in float64."""
    out = _merge("0 * a + model_sum(a * a)", "float64")
    want = sum(float((v.double() ** 2).sum()) for v in A.values())
    assert float(out["b"][0]) == pytest.approx(want, rel=1e-15)


def test_float64_plan_is_not_fused_and_counts_8_bytes() -> None:
    from mergelang.ir.ops import Op
    from mergelang.passes.pipeline import Target, plan_for

    big = {k: {"w": torch.randn(512, 512, generator=torch.Generator().manual_seed(i))}
           for i, k in enumerate(("base", "a", "b"))}  # fusion skips tiny tensors
    src = HEAD + '{}merge from base {{ "*" => base + 0.5 * (a - base) + 0.25 * (b - base) }}\n'
    plans = {}
    for cd in ("float32", "float64"):
        r = ml.compile(src.format(f'option compute_dtype = "{cd}"\n'), **big)
        plans[cd] = plan_for(r.compilation.plan, Target("cpu", None, True, lambda: True)).plan
    fused = {cd: any(n.op is Op.FUSED for _, n in p.graph.items()) for cd, p in plans.items()}
    assert fused == {"float32": True, "float64": False}
    unfused32 = ml.compile(src.format(""), **big).compilation.plan
    assert plans["float64"].peak_bytes == 2 * unfused32.peak_bytes


def test_bad_compute_dtype_is_E402() -> None:
    with pytest.raises(ml.MergelangError) as exc:
        ml.compile(HEAD + 'option compute_dtype = "float16"\nmerge from base { "*" => a }\n',
                   base=BASE, a=A, b=B)
    assert "E402" in str(exc.value) and "compute_dtype" in str(exc.value)


# ---------------------------------------------------------------- the CLI, and the default unchanged
RECIPE = '''model base = "base"
model a = "a"
model b = "b"
merge from base {
    "*.b" => slerp(a, b, t = 0.3)
    "*" => ties(base, [a, b], weights = [0.3, 0.7], density = 0.5)
}
'''

#: sha256 of the output tensors' bytes (sorted by name) of RECIPE on these inputs, written by the
#: code before compute_dtype existed (commit 4a62a45, `mergelang run`, float32 compute)
DEFAULT_DIGEST = "e74964859d207351d67e3f7a537b331d56dfc1b8c3a1cb2a9a5304fcaf97f204"


def _project(tmp_path: Path) -> Path:
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        g = torch.Generator().manual_seed(seed)
        save_file({"l.w": torch.randn(16, 24, generator=g), "l.b": torch.randn(24, generator=g)},
                  str(tmp_path / name / "model.safetensors"))
    (tmp_path / "r.mrg").write_text(RECIPE)
    return tmp_path / "r.mrg"


def _digest(folder: Path) -> str:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].numpy().tobytes())
    return h.hexdigest()


def _run(recipe: Path, out: Path, *extra: str) -> None:
    res = CliRunner().invoke(cli_main, ["run", str(recipe), "-o", str(out), "-q", *extra])
    assert res.exit_code == 0, res.output


def test_default_output_is_byte_identical_to_before(tmp_path: Path) -> None:
    recipe = _project(tmp_path)
    _run(recipe, tmp_path / "out")
    _run(recipe, tmp_path / "out32", "--compute-dtype", "float32")
    assert _digest(tmp_path / "out") == _digest(tmp_path / "out32") == DEFAULT_DIGEST


def test_run_compute_dtype_flag(tmp_path: Path) -> None:
    """--compute-dtype float64 on run: the float32 output is the float64 result rounded once
    (equal to the API's float64 evaluation cast to float32); it differs from float32 compute."""
    recipe = _project(tmp_path)
    _run(recipe, tmp_path / "o64", "--compute-dtype", "float64")
    _run(recipe, tmp_path / "o32")
    got = load_file(str(next((tmp_path / "o64").glob("*.safetensors"))))
    f32 = load_file(str(next((tmp_path / "o32").glob("*.safetensors"))))
    ref = ml.compile(recipe, compute_dtype="float64", dtype="float64").evaluate()
    models = {n: load_file(str(tmp_path / n / "model.safetensors")) for n in ("base", "a", "b")}
    want = ties64(models["base"]["l.w"], [models["a"]["l.w"], models["b"]["l.w"]], [0.3, 0.7], 0.5)
    torch.testing.assert_close(ref["l.w"], want, rtol=1e-14, atol=1e-15)
    for k in got:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], ref[k].float())
    assert any(not torch.equal(got[k], f32[k]) for k in got)


def test_float64_iterate_loop() -> None:
    """An `iterate` compiled to one loop node: its body's constants and values are float64 too."""
    src = (HEAD + 'option compute_dtype = "float64"\noption dtype = "float64"\n'
           "fn step(x, a) {\n    return x * 0.9 + 0.1 * a\n}\n"
           'merge from base { "*" => iterate("step", base, 7, [a]) }\n')
    r = ml.compile(src, base=BASE, a=A, b=B)
    assert "loop" in r.emit("plan")
    out = r.evaluate()
    for k in BASE:
        x, a = BASE[k].double(), A[k].double()
        for _ in range(7):
            x = x * 0.9 + 0.1 * a
        torch.testing.assert_close(out[k], x, rtol=1e-15, atol=1e-15)


def test_float64_row_chunks_fit_the_budget() -> None:
    """The memory budget counts 8 bytes per float64 value: a float64 plan is split into more
    row chunks than the float32 one, within the budget, and the chunked result equals the
    unchunked one."""
    from mergelang.passes.pipeline import Target, plan_for
    from mergelang.ir.ops import Op

    big = {k: {"w": torch.randn(256, 128, generator=torch.Generator().manual_seed(i))}
           for i, k in enumerate(("base", "a", "b"))}
    src = HEAD + '{}merge from base {{ "*" => base + 0.3 * (a - base) + 0.7 * (b - base) }}\n'
    chunks = {}
    for cd in ("float32", "float64"):
        r = ml.compile(src.format(f'option compute_dtype = "{cd}"\n'), **big)
        p = plan_for(r.compilation.plan, Target("cpu", 256 << 10, False)).plan
        chunks[cd] = sum(1 for _, n in p.graph.items() if n.op is Op.OUTPUT)
        assert p.peak_bytes <= 256 << 10
    assert chunks["float64"] > chunks["float32"] > 1
    r = ml.compile(src.format('option compute_dtype = "float64"\n'), **big)
    whole = r.evaluate()
    from mergelang.runtime.executor import execute

    got: dict[str, list] = {}
    p = plan_for(r.compilation.plan, Target("cpu", 256 << 10, False)).plan

    class Rows(dict):
        def write_rows(self, name, t, start, total):
            got.setdefault(name, []).append((start, t))

        def __call__(self, name, t):
            got.setdefault(name, []).append((0, t))
    execute(p, r.compilation.models, Rows(), "cpu", memory_budget=256 << 10)
    assembled = torch.cat([t for _, t in sorted(got["w"], key=lambda x: x[0])])
    assert torch.equal(assembled, whole["w"])
