"""run --report against hostile bfloat16 data, each number compared with a float64 computation
written here: τ and τo so small that their product underflows float32 (the kept / against
counts must still be exact), and the whole run on such checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelang as ml
from mergelang.tools.merge_report import run_sums


def counts(b: torch.Tensor, x: torch.Tensor, o: torch.Tensor) -> tuple[int, int, int]:
    """(τ ≠ 0, kept, against) by the signs of τ and τo, in float64."""
    t, to = x.double() - b.double(), o.double() - b.double()
    nz = t != 0
    same = torch.sign(t) == torch.sign(to)
    return int(nz.sum()), int((nz & (to != 0) & same).sum()), int((nz & (to != 0) & ~same).sum())


def tiny_case(n: int, models: int, tiny: list[float]) -> tuple:
    """bfloat16 tensors, normal values in the second half; in the first half the base is 0 and
    input j holds tiny[j] (the output 0.6 of their mean): τ·τo is under float32's smallest subnormal
    while every sum of squares is far above report_kernels.FLOOR (no float64 pass)."""
    g = torch.Generator().manual_seed(n + models)
    base = torch.randn(n, generator=g)
    xs = [base + 0.05 * torch.randn(n, generator=g) for _ in range(models)]
    k = n // 2
    base[:k] = 0
    for x, v in zip(xs, tiny):
        x[:k] = v
    out = 0.6 * sum(xs) / models + 0.4 * base  # equal to no input: no float64 pass
    bf = torch.bfloat16
    return base.to(bf), [x.to(bf) for x in xs], out.to(bf)


@pytest.mark.parametrize("models", [1, 2, 3])
@pytest.mark.parametrize("tiny", [[1e-23, 2e-23, 3e-23], [3e-39, -5e-39, 1e-39]])
def test_kept_and_against_exact_when_the_product_underflows_float32(models, tiny):
    base, xs, out = tiny_case(5000, models, tiny)
    assert (base.float() * out.float())[:10].eq(0).all()
    for x, s in zip(xs, run_sums(base, xs, out)):
        nnz, kept, against = counts(base, x, out)
        assert (s.nnz, s.kept, s.against) == (nnz, kept, against)
        assert s.st >= 2.0 ** -60 and s.sto >= 2.0 ** -60  # the float32 pass was kept


def test_report_of_a_run_on_tiny_task_vectors(tmp_path):
    """A bfloat16 linear merge whose large tensor has tiny task vectors in half its entries:
    the report's kept / against / dropped are those of the written output."""
    base, xs, _ = tiny_case(70_000, 2, [1e-23, 3e-23])
    name = "model.layers.0.mlp.up_proj.weight"
    for lab, t in (("base", base), ("a", xs[0]), ("b", xs[1])):
        (tmp_path / lab).mkdir()
        save_file({name: t.reshape(700, 100)}, str(tmp_path / lab / "model.safetensors"))
    text = 'model base = "base"\nmodel a = "a"\nmodel b = "b"\nmerge from base {\n    "*" => linear([a, b])\n}\n'
    (tmp_path / "r.mrg").write_text(text)
    ml.compile(tmp_path / "r.mrg").run(tmp_path / "out", device="cpu", report=True)
    out = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))[name].reshape(-1)
    rep = json.loads((tmp_path / "out" / "mergelang_report.json").read_text())
    for lab, x in (("a", xs[0]), ("b", xs[1])):
        nnz, kept, against = counts(base, x, out)
        got = rep["tensors"][name]["inputs"][lab]
        assert got["tau_nonzero"] == nnz
        assert got["kept"] == kept / nnz and got["against"] == against / nnz
        assert got["dropped"] == (nnz - kept - against) / nnz


def test_signed_sums_whose_products_underflow_float32_are_summed_in_float64():
    """‖τ‖² and ‖τo‖² at or above report_kernels.FLOOR (‖τ‖² exactly 2**-60) from entries where
    the other is zero, and ⟨τo, τ⟩ only from products τ·τo ~ 2**-161 (lost in float32): the
    tensor is summed again in float64 (projection and cosine_tau exact, not 0)."""
    n = 4096
    b, x, o = torch.ones(n), torch.ones(n), torch.ones(n)
    b[:100], x[:100], o[:100] = 0, 2.0 ** -80, 2.0 ** -81  # τ·τo = 2**-161
    b[100], x[100], o[100] = 0, 2.0 ** -30, 0  # ‖τ‖² = 2**-60 (+ 100 * 2**-160)
    b[201:301], x[201:301], o[201:301] = 0, 0, 2.0 ** -31  # ‖τo‖² = 100 * 2**-62
    o[200] = 2.0  # o ≠ x: ‖o − x‖² = 1
    b, x, o = (t.to(torch.bfloat16) for t in (b, x, o))
    (s,) = run_sums(b, [x], o)
    t, to = x.double() - b.double(), o.double() - b.double()
    assert s.dtt == pytest.approx(float(to @ t), rel=1e-12) and s.dtt == 100 * 2.0 ** -161
    assert s.st == pytest.approx(float(t @ t), rel=1e-12) and s.sto == pytest.approx(float(to @ to), rel=1e-12)
    assert (s.nnz, s.kept, s.against) == counts(b, x, o)


def test_an_empty_tensor_is_not_listed_as_not_measured(tmp_path):
    """"not_measured" lists the tensors --resume kept; a tensor of no entries has nothing to
    measure and is not listed (a fresh run reports not_measured == [])."""
    g = torch.Generator().manual_seed(2)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g), "model.layers.0.empty.weight":
            torch.zeros(0, 4)}
    for lab, sd in (("base", base), ("a", {k: v + 0.1 for k, v in base.items()}),
                    ("b", {k: v - 0.2 for k, v in base.items()})):
        (tmp_path / lab).mkdir()
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(tmp_path / lab / "model.safetensors"))
    text = 'model base = "base"\nmodel a = "a"\nmodel b = "b"\nmerge from base {\n    "*" => linear([a, b])\n}\n'
    (tmp_path / "r.mrg").write_text(text)
    ml.compile(tmp_path / "r.mrg").run(tmp_path / "out", device="cpu", report=True)
    rep = json.loads((tmp_path / "out" / "mergelang_report.json").read_text())
    assert rep["not_measured"] == [] and list(rep["tensors"]) == ["model.layers.0.mlp.up_proj.weight"]
