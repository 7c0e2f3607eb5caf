"""The run contract (issue 29): one Target per run, one Executor protocol for every executor,
the statistics collector's `merge` (local and Ray runs add partials alike), the optional
features of the model-source protocol, and io/package.py's config.json. Expected values come
from plain torch / dict computations, not from the code under test."""

from __future__ import annotations

import json

import pytest
import torch

import mergelang as ml
from mergelang.io.checkpoint import DictSource, WrappedSource
from mergelang.io.layout import OutputTensor
from mergelang.io.package import Package, config_override
from mergelang.passes.pipeline import plan_for
from mergelang.passes.stats import StatSpec
from mergelang.runtime.executor import (Executor, OverlappedExecutor, SequentialExecutor, execute,
                                        local_executor, target_for)
from mergelang.runtime.runargs import RunArgumentError, check_run_args
from mergelang.runtime.stats import StatCollector, StatPartial

SHAPES = {"w": (6, 5), "v": (7,), "u": (3, 4)}


def _feeds(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn((2, *s), generator=g) for n, s in SHAPES.items()}  # 2 models


def _specs(kind: str, frac: float = 0.3) -> tuple[StatSpec, ...]:
    numel = sum(torch.Size(s).numel() for s in SHAPES.values())
    return (StatSpec("k", kind, frac, 2, 0, numel, len(SHAPES)),)


def _collect(col: StatCollector, feeds: dict[str, torch.Tensor], by_partials: bool) -> dict:
    """Round after round: each feed straight into the collector, or as a worker would (one
    partial per feed for sums and entries, merged in feed order; histograms summed per unit)."""
    while True:
        if by_partials:
            parts = {n: col.partial(f"k\t{n}", t) for n, t in feeds.items()}
            unit = StatPartial()
            for p in reversed(list(parts.values())):  # integer counts: any order
                unit.add(StatPartial(hist=p.hist))
            col.merge(unit)
            for p in parts.values():
                col.merge(StatPartial(p.sums, p.parts))
        else:
            for n, t in feeds.items():
                col(f"k\t{n}", t)
        if not col.finish():
            return col.values


@pytest.mark.parametrize("limit", [None, 0])  # entries kept (kthvalue) / radix select
@pytest.mark.parametrize("kind", ["sum", "topk_value"])
def test_merge_of_partials_equals_the_direct_collector_and_torch(kind, limit):
    feeds = _feeds(0)
    flat = torch.cat([t.reshape(2, -1) for t in feeds.values()], dim=1)
    if kind == "sum":
        want = tuple(float(v) for v in flat.double().sum(dim=1))
    else:
        n = flat.shape[1]
        want = tuple(float(v) for v in torch.kthvalue(flat, n - int(n * 0.3), dim=1).values)
    direct = _collect(StatCollector(_specs(kind), limit), feeds, False)
    merged = _collect(StatCollector(_specs(kind), limit), feeds, True)
    assert direct == merged
    if kind == "sum":
        assert merged["k"] == pytest.approx(want, rel=1e-12)
    else:
        assert merged["k"] == want


def test_merge_leaves_out_statistics_already_computed():
    col = StatCollector(_specs("sum"))
    part = StatPartial(sums={"k": torch.tensor([1.0, 2.0], dtype=torch.float64)})
    col.merge(part)
    assert not col.finish()
    col.merge(part)  # a second round's partial of a finished statistic
    assert not col.finish() and col.values["k"] == (1.0, 2.0)


def _recipe_and_inputs():
    g = torch.Generator().manual_seed(3)
    a = {"x": torch.randn(64, 8, generator=g), "y": torch.randn(5, generator=g)}
    b = {k: torch.randn(v.shape, generator=g) for k, v in a.items()}
    r = ml.compile('model a = "<memory>"\nmodel b = "<memory>"\n'
                   'merge from a {\n  "*" => a * 0.75 + b * 0.5 + model_sum(b)\n}\n', a=a, b=b)
    want = {k: a[k] * 0.75 + b[k] * 0.5 + float(sum(t.double().sum() for t in b.values()))
            for k in a}
    return r, want


@pytest.mark.parametrize("make", [SequentialExecutor, OverlappedExecutor,
                                  lambda: local_executor(pipelined=False)])
@pytest.mark.parametrize("budget", [None, 600])  # 600 bytes: x runs in row chunks
def test_every_local_executor_runs_the_contract(make, budget):
    r, want = _recipe_and_inputs()
    runner: Executor = make()
    target = target_for("cpu", budget)
    out: dict[str, torch.Tensor] = {}
    runner.run(plan_for(r.compilation.plan, target).plan, r.compilation.models, out.__setitem__,
               target)
    runner.close()
    assert out.keys() == want.keys()
    for k, t in want.items():
        torch.testing.assert_close(out[k], t, rtol=1e-6, atol=1e-5)
    same: dict[str, torch.Tensor] = {}  # the compatibility form: a device, resolved inside
    execute(plan_for(r.compilation.plan, target).plan, r.compilation.models, same.__setitem__,
            "cpu", memory_budget=budget)
    assert all(torch.equal(same[k], out[k]) for k in out)
    r.close()


def test_the_target_is_resolved_once_and_passes_through():
    t = check_run_args("out", "cpu", None, "local", "1MB")
    assert t.device == "cpu" and t.memory_budget == 1_000_000
    assert check_run_args("out", t, None, "local") is t
    with pytest.raises(RunArgumentError) as info:
        check_run_args("out", t, None, "local", 10)
    assert info.value.codes == ["E402"]
    with pytest.raises(ValueError):
        target_for("cuda" if not torch.cuda.is_available() else "nope")


class _Patched(DictSource):
    def config_patch(self):
        return {"num_hidden_layers": 3}

    @property
    def block_scaled(self) -> bool:
        return True

    def block_scale(self, name):
        return (name + "_scale_inv", (2, 2), 448.0) if name == "w" else None

    def tokenizer_files(self):
        return {"tokenizer.json": "{}"}


class _Wrapper(WrappedSource):
    def load_as(self, name, dtype=None, *, view=False):
        return self.inner.load_as(name, dtype, view=view)


def test_optional_source_features_default_to_none_and_are_forwarded():
    plain = DictSource("p", {"w": torch.zeros(2, 2)})
    assert (plain.block_scale("w"), plain.stored_block_scale("w"), plain.config_patch(),
            plain.tokenizer_files(), plain.block_scaled) == (None, None, None, None, False)
    inner = _Patched("q", {"w": torch.zeros(2, 2)})
    w = _Wrapper(_Wrapper(inner))
    assert w.block_scale("w") == ("w_scale_inv", (2, 2), 448.0) and w.block_scale("v") is None
    assert w.stored_block_scale("w") == ("w_scale_inv", (2, 2), 448.0)
    assert w.config_patch() == {"num_hidden_layers": 3} and w.block_scaled
    assert w.tokenizer_files() == {"tokenizer.json": "{}"}


def test_package_patches_config_json_and_drops_fp8_quantization(tmp_path):
    cfg = {"num_hidden_layers": 2, "torch_dtype": "float8_e4m3fn", "dtype": "x",
           "quantization_config": {"quant_method": "fp8"}, "hidden_size": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    src = _Wrapper(_Patched("q", {"w": torch.zeros(2, 2)}))
    outs = [OutputTensor("w", (2, 2), "bfloat16")]
    pkg = Package(outs, {"q": src}, {"q": {"config.json": tmp_path / "config.json"}}, "q", {}, set(),
                  "", {}, dtype="bfloat16")
    got = json.loads(config_override(pkg, src, pkg.copies["q"])["config.json"])
    want = {k: v for k, v in cfg.items() if k != "quantization_config"}
    want.update(num_hidden_layers=3, torch_dtype="bfloat16", dtype="bfloat16")
    assert got == want
    keep = Package(outs, {"q": src}, pkg.copies, "q", {}, set(), "", {}, dtype=None)
    kept = json.loads(config_override(keep, src, keep.copies["q"])["config.json"])
    assert kept["quantization_config"] == cfg["quantization_config"] and kept["torch_dtype"] == "bfloat16"
