"""Original TIES (`ties_global`) and the model-wide statistics it is built on (stats.py).

The reference is the ties-merging repo's algorithm written here in plain torch over the
concatenation of a whole model's task vectors (flattened, in tensor order), then split back.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import helpers
import mergelang as ml
from mergelang.cli import main
from mergelang.passes import stats
from mergelang.diagnostics import MergelangError

SHAPES = {"embed.weight": (8, 6), "layers.0.mlp.weight": (5, 4, 3), "layers.0.bias": (7,),
          "norm.weight": (6,), "one": (1,)}


def make_sd(seed: int, shapes=SHAPES) -> dict[str, torch.Tensor]:
    return helpers.make_sd(seed, shapes)


def reference_ties(base, models, names, k=0.2, lam=1.0, merge="mean"):
    """ties-merging repo: topk_values_mask + resolve_sign('majority') + disjoint_merge."""
    flat = torch.stack([torch.cat([(m[n] - base[n]).reshape(-1) for n in names]) for m in models])
    d = flat.shape[1]
    kk = max(d - int(d * k), 1)
    kth = flat.abs().kthvalue(kk, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    signs = torch.sign(trimmed.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    keep = torch.where(signs.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    if merge == "mean":
        tv = sel.sum(dim=0) / torch.clamp((sel != 0).sum(dim=0).float(), min=1)
    else:
        tv = sel.sum(dim=0)
    out, i = {}, 0
    for n in names:
        numel = base[n].numel()
        out[n] = base[n] + lam * tv[i:i + numel].reshape(base[n].shape)
        i += numel
    return out


def _check(out, want):
    for n, w in want.items():
        torch.testing.assert_close(out[n], w, rtol=1e-6, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.fixture(params=["buffer", "radix"])
def select(request, monkeypatch):
    """Both exact threshold algorithms: kept entries + kthvalue, and the two-round radix select."""
    if request.param == "radix":
        monkeypatch.setattr(stats, "BUFFER_LIMIT", 0)
    return request.param


@pytest.mark.parametrize("k", [0.2, 0.5, 1.0, 0.0])
@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_ties_global_matches_reference(k, merge, select):
    base, a, b, c = (make_sd(s) for s in range(4))
    out = ml.merge(f'ties_global(base, [a, b, c], k = {k}, lambda = 0.7, merge = "{merge}")',
                   base=base, a=a, b=b, c=c)
    _check(out, reference_ties(base, [a, b, c], list(SHAPES), k, 0.7, merge))


def test_threshold_is_model_wide_not_per_tensor(select):
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    a = make_sd(1)
    a["embed.weight"] *= 100  # all of the top 20% lies in one tensor
    out = ml.merge("ties_global(base, [a], k = 0.2)", base=base, a=a)
    assert torch.count_nonzero(out["embed.weight"]) > 0
    for n in SHAPES:
        if n != "embed.weight":
            assert torch.count_nonzero(out[n]) == 0, n
    _check(out, reference_ties(base, [a], list(SHAPES), 0.2))


def test_masks_exact_with_magnitude_ties(select):
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    a = {k: torch.sign(torch.randn(s, generator=torch.Generator().manual_seed(3))) for k, s in SHAPES.items()}
    b = {k: 2 * torch.ones(s) for k, s in SHAPES.items()}
    out = ml.merge("ties_global(base, [a, b], k = 0.3)", base=base, a=a, b=b)
    want = reference_ties(base, [a, b], list(SHAPES), 0.3)
    for n in SHAPES:
        assert torch.equal(out[n], want[n]), n


@pytest.mark.parametrize("majority", [1.0, -1.0, 0.0])
def test_zero_elected_sign_takes_the_model_majority(majority, select):
    """Entries where the trimmed task vectors cancel (gamma = 0) take sign(sum gamma); when that
    is 0 too, the repo keeps the negative entries (its where(sign > 0, tv > 0, tv < 0))."""
    names = ["x", "y"]
    base = {"x": torch.zeros(4), "y": torch.zeros(3)}
    # x: entries 0 and 1 cancel exactly (gamma = 0); y decides the majority sign
    a = {"x": torch.tensor([1.0, -2.0, 3.0, 0.0]), "y": torch.tensor([1.0, 1.0, 1.0]) * majority}
    b = {"x": torch.tensor([-1.0, 2.0, 0.0, 0.0]), "y": torch.tensor([1.0, 1.0, -1.0]) * majority}
    if majority == 0.0:  # gamma: x -> [0, 0, +1, 0], y -> [0, 0, -1]: sum of gamma = 0
        a["y"] = torch.tensor([0.0, 0.0, 0.0])
        b["y"] = torch.tensor([0.0, 0.0, -5.0])
    out = ml.merge("ties_global(base, [a, b], k = 1.0)", base=base, a=a, b=b)
    want = reference_ties(base, [a, b], names, 1.0)
    for n in names:
        assert torch.equal(out[n], want[n]), (n, out[n], want[n])
    g = torch.sign(torch.cat([a["x"] + b["x"], a["y"] + b["y"]]))
    maj = torch.sign(g.sum())
    assert maj == majority
    if maj > 0:
        assert out["x"][0] == 1.0 and out["x"][1] == 2.0
    else:
        assert out["x"][0] == -1.0 and out["x"][1] == -2.0


def test_statistic_covers_only_the_tensors_routed_to_the_call():
    base, a, b = make_sd(0), make_sd(1), make_sd(2)
    a["norm.weight"] *= 1000  # would dominate the threshold if norms took part
    text = ('model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'
            'merge from base {\n  "*norm*" => base\n  "*" => ties_global(base, [a, b], k = 0.25)\n}\n')
    out = ml.compile(text, base=base, a=a, b=b).evaluate()
    names = [n for n in SHAPES if "norm" not in n]
    _check({n: out[n] for n in names}, reference_ties(base, [a, b], names, 0.25))
    assert torch.equal(out["norm.weight"], base["norm.weight"])
    # the statistics passes do not read the tensors routed elsewhere
    plan = ml.compile(text, base=base, a=a, b=b).compilation.plan
    assert len(plan.prepasses) == 2
    for pp in plan.prepasses:
        reads = {pp.graph.node(s.nid).attrs.get("tensor") for s in pp.steps
                 if pp.graph.node(s.nid).op.value == "load"}
        assert reads == set(names)


def test_sequential_and_pipelined_executors_agree():
    base, a, b = make_sd(0), make_sd(1), make_sd(2)
    r = ml.compile('model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'
                   'merge from base {\n  "*" => ties_global(base, [a, b])\n}\n', base=base, a=a, b=b)
    one, two = r.evaluate(pipelined=False), r.evaluate(pipelined=True)
    for n in SHAPES:
        assert torch.equal(one[n], two[n]), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():  # pragma: no cover - no GPU in CI
    base, a, b = make_sd(0), make_sd(1), make_sd(2)
    r = ml.compile('model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'
                   'merge from base {\n  "*" => ties_global(base, [a, b])\n}\n', base=base, a=a, b=b)
    cpu, gpu = r.evaluate("cpu"), r.evaluate("cuda")
    for n in SHAPES:
        torch.testing.assert_close(gpu[n], cpu[n], rtol=1e-5, atol=1e-6)


def test_two_call_sites_are_two_statistics():
    base, a, b = make_sd(0), make_sd(1), make_sd(2)
    text = ('model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'
            'merge from base {\n  "layers.*" => ties_global(base, [a, b], k = 0.3)\n'
            '  "*" => ties_global(base, [a, b], k = 0.3)\n}\n')
    r = ml.compile(text, base=base, a=a, b=b)
    out = r.evaluate()
    first = [n for n in SHAPES if n.startswith("layers.")]
    rest = [n for n in SHAPES if not n.startswith("layers.")]
    _check({n: out[n] for n in first}, reference_ties(base, [a, b], first, 0.3))
    _check({n: out[n] for n in rest}, reference_ties(base, [a, b], rest, 0.3))
    plan = r.emit("plan")
    assert plan.startswith("# pass 1 of 3: model-wide statistics")
    assert plan.count("model_topk_value(") >= 2 and "# pass 3 of 3: apply" in plan


def test_model_sum_primitive():
    base, a = make_sd(0), make_sd(1)
    out = ml.merge("base * 0 + model_sum(abs(a - base))", base=base, a=a)
    total = sum(float((a[n] - base[n]).abs().double().sum()) for n in SHAPES)
    for n in SHAPES:
        assert torch.allclose(out[n], torch.full(SHAPES[n], total), rtol=1e-6)


def test_plan_without_statistics_has_one_pass():
    r = ml.compile('model base = "<memory>"\nmerge from base {\n  "*" => base * 2\n}\n',
                   base=make_sd(0))
    assert "pass" not in r.emit("plan")


def test_errors():
    base, a = make_sd(0), make_sd(1)
    with pytest.raises(MergelangError) as info:
        ml.merge("ties_global(base, [a], k = 1.5)", base=base, a=a)
    assert "E220" in info.value.codes
    with pytest.raises(MergelangError) as info:
        ml.merge("where(model_topk_value(a > 0, 0.5) > 0, a, base)", base=base, a=a)
    assert "E221" in info.value.codes
    with pytest.raises(MergelangError) as info:
        ml.merge('ties_global(base, [a], merge = "max")', base=base, a=a)
    assert "mean" in str(info.value)


def test_cli_run_on_tiny_checkpoints(tmp_path, select):
    sds = {n: make_sd(i) for i, n in enumerate(["base", "m1", "m2", "m3"])}
    for n, sd in sds.items():
        save_file(sd, str(tmp_path / f"{n}.safetensors"))
    recipe = tmp_path / "r.mrg"
    recipe.write_text("\n".join(f'model {n} = "{tmp_path / (n + ".safetensors")}"' for n in sds)
                      + '\nmerge from base {\n  "*norm*" => base\n'
                      '  "*" => ties_global(base, [m1, m2, m3], k = 0.2, merge = "sum")\n}\n')
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "out"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / f)))
    names = [n for n in SHAPES if "norm" not in n]
    want = reference_ties(sds["base"], [sds["m1"], sds["m2"], sds["m3"]], names, 0.2, 1.0, "sum")
    _check({n: out[n] for n in names}, want)
    assert torch.equal(out["norm.weight"], sds["base"]["norm.weight"])
    result = CliRunner().invoke(main, ["compile", str(recipe), "--emit", "plan"])
    assert result.exit_code == 0 and "# pass 2 of 3: model-wide statistics" in result.output
    assert ("radix select" in result.output) == (select == "radix")


def test_model_topk_value_radix_select_is_exact(monkeypatch):
    """Random values with duplicates, negatives, zeros and -0.0: the same threshold as
    torch.kthvalue over the concatenation, for every fraction."""
    g = torch.Generator().manual_seed(5)
    shapes = {"p": (37, 11), "q": (200,), "r": (3, 3, 3)}
    x = {n: torch.randn(s, generator=g).round(decimals=1) for n, s in shapes.items()}
    x["q"][:20] = -0.0
    x["q"][20:40] = 0.0
    flat = torch.cat([v.reshape(-1) for v in x.values()])
    for frac in (0.0, 0.013, 0.25, 0.5, 0.9, 1.0):
        want = flat.kthvalue(max(flat.numel() - int(flat.numel() * frac), 1)).values
        for limit in (1 << 30, 0):
            monkeypatch.setattr(stats, "BUFFER_LIMIT", limit)
            out = ml.merge(f"x * 0 + model_topk_value(x, {frac})", x=x)
            for n in shapes:
                assert torch.equal(out[n], torch.full(shapes[n], float(want))), (frac, limit, n)


def test_memory_budget_switches_to_radix_select(monkeypatch):
    from mergelang.runtime.executor import run_plan

    base, a, b = make_sd(0), make_sd(1), make_sd(2)
    r = ml.compile('model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'
                   'merge from base {\n  "*" => ties_global(base, [a, b], k = 0.3)\n}\n',
                   base=base, a=a, b=b)
    plan, models = r.compilation.plan, r.compilation.models
    calls = []
    from mergelang.runtime import stats as run_stats

    real = run_stats.run_stat_passes

    def counting(p, run, budget=None):
        return real(p, lambda pp, sink: (calls.append(pp), run(pp, sink)), budget)

    monkeypatch.setattr(run_stats, "run_stat_passes", counting)
    want = reference_ties(base, [a, b], list(SHAPES), 0.3)
    for budget, passes in ((None, 2), (plan.prepasses[0].peak_bytes + 10, 3)):
        calls.clear()
        out: dict = {}
        run_plan(plan, models, out.__setitem__, memory_budget=budget)
        assert len(calls) == passes  # the radix select streams the threshold pass twice
        _check(out, want)


def test_explain_mentions_the_statistics_passes():
    from mergelang.explain import explain_text

    base, a, b = make_sd(0), make_sd(1), make_sd(2)
    r = ml.compile('model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'
                   'merge from base {\n  "*" => ties_global(base, [a, b])\n}\n', base=base, a=a, b=b)
    text = explain_text(r.compilation)
    assert "model-wide statistics: 2, computed by 2 streaming pass(es)" in text


@pytest.mark.parametrize("limit", [1 << 30, 0])
def test_empty_tensors_only(monkeypatch, limit):
    monkeypatch.setattr(stats, "BUFFER_LIMIT", limit)
    shapes = {"e": (0, 3)}
    base, a = make_sd(0, shapes), make_sd(1, shapes)
    out = ml.merge("ties_global(base, [a], k = 0.5)", base=base, a=a)
    assert out["e"].shape == (0, 3)


def test_every_pass_graph_verifies_after_every_optimization():
    from mergelang.ir.graph import verify
    from mergelang.passes.optimize import optimize
    from mergelang.passes.stats import split_stats

    base, a, b = make_sd(0), make_sd(1), make_sd(2)
    r = ml.compile('model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'
                   'merge from base {\n  "*norm*" => base\n  "*" => ties_global(base, [a, b])\n}\n',
                   base=base, a=a, b=b)
    verify(r.compilation.graph)
    passes, apply_graph, specs = split_stats(r.compilation.graph)
    assert [s.level for s in specs] == [0, 1] and len(passes) == 2
    for g in [*passes, apply_graph]:
        verify(g)
        optimize(g, check=verify)
