"""`Recipe.learn`: coefficients fitted by gradient descent through the merge graph, checked
against known coefficients (the loss compares with an independently computed target)."""

from __future__ import annotations

import pytest
import torch

import mergelang as ml
from mergelang.diagnostics import MergelangError

L = 3


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.w": torch.randn(12, 12, generator=g) for i in range(L)} | \
        {"norm": torch.randn(12, generator=g)}


BASE, A, B = _sd(0), _sd(1), _sd(2)
HEAD = 'model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'


def _recipe(body: str) -> ml.Recipe:
    return ml.compile(HEAD + body, base=BASE, a=A, b=B)


def _target(coef) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.w": BASE[f"layers.{i}.w"] + coef[i][0] * (A[f"layers.{i}.w"] - BASE[f"layers.{i}.w"])
            + coef[i][1] * (B[f"layers.{i}.w"] - BASE[f"layers.{i}.w"]) for i in range(L)}


def test_layer_wise_coefficients_are_recovered() -> None:
    true = [[0.2, 0.9], [0.6, 0.4], [1.1, -0.3]]
    target = _target(true)
    r = _recipe("param lam = [[0.3, 0.3], [0.3, 0.3], [0.3, 0.3]] learn\n"
                'merge from base {\n    "layers.{i}.w" => task_arithmetic(base, [a, b], weights = lam[i])\n'
                '    "*" => base\n}\n')

    def loss(state, batch):
        assert state["norm"].requires_grad is False  # a constant: no gradient work for it
        return sum((state[k] - target[k]).pow(2).mean() for k in target)
    res = r.learn(loss, range(300), lr=0.05)
    for got, want in zip(res.values["lam"], true):
        assert got == pytest.approx(want, abs=1e-3)
    assert res.losses[-1] < 1e-6 < res.losses[0]
    assert not res.warnings


def test_task_wise_coefficient_with_a_range_is_clamped() -> None:
    target = _target([[0.9, 0.9]] * L)
    r = _recipe("param lam = 0.3 in [0, 0.5] learn\n"
                'merge from base { "*" => base + lam * sum([a, b] - base, over = "models") }\n')

    def loss(state, batch):
        return sum((state[k] - target[k]).pow(2).mean() for k in target)
    res = r.learn(loss, range(100), lr=0.05, optimizer="sgd", steps=150)
    assert res.values["lam"] == pytest.approx(0.5)  # the optimum 0.9 lies outside [0, 0.5]
    assert len(res.losses) == 150  # steps cycle over the batches


def test_learned_merge_is_written(tmp_path) -> None:
    from safetensors.torch import load_file

    r = _recipe("param lam = [0.3, 0.3] learn\n"
                'merge from base { "*" => task_arithmetic(base, [a, b], weights = lam) }\n')
    target = _target([[0.5, 0.25]] * L)
    res = r.learn(lambda s, b: sum((s[k] - target[k]).pow(2).mean() for k in target), [0] * 200, lr=0.05)
    out = res.run(tmp_path / "out", device="cpu")
    got = load_file(next(out.glob("*.safetensors")))
    want = res.evaluate()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.allclose(got["layers.1.w"], target["layers.1.w"], atol=1e-4)


def test_zero_gradient_warns_W106() -> None:
    r = _recipe("param lam = 0.3 learn\nparam mu = 0.5 learn\n"
                'merge from base {\n    "norm" => base + mu * (a - base)\n    "*" => base + lam * (a - base)\n}\n')
    res = r.learn(lambda s, b: (s["layers.0.w"] - A["layers.0.w"]).pow(2).mean(), range(5))
    codes = [(d.code, d.message) for d in res.warnings]
    assert [c for c, _ in codes] == ["W106"] and "`mu`" in codes[0][1]
    assert res.values["mu"] == 0.5


def test_a_param_read_at_compile_time_cannot_be_learned_E906() -> None:
    r = _recipe("param k = 1.0 learn\n"
                'merge from base {\n    "*" => if k > 0.5 then a else b\n}\n')
    with pytest.raises(MergelangError) as ei:
        r.learn(lambda s, b: s["norm"].sum(), range(2))
    d = ei.value.diagnostics[0]
    assert d.code == "E906" and "`k`" in d.message


def test_a_density_is_learnable_only_in_name_W106() -> None:
    """A top-k density is a run-time input but not differentiable: its gradient is zero."""
    r = _recipe("param d = 0.5 in [0.1, 1] learn\n"
                'merge from base { "*" => ties(base, [a, b], density = d) }\n')
    res = r.learn(lambda s, b: s["layers.0.w"].pow(2).mean(), range(3))
    assert [w.code for w in res.warnings] == ["W106"]


def test_nothing_to_learn_E901_and_bad_loss_E903() -> None:
    r = _recipe('param lam = 0.3\nmerge from base { "*" => base + lam * (a - base) }\n')
    with pytest.raises(MergelangError) as ei:
        r.learn(lambda s, b: s["norm"].sum(), range(2))
    assert ei.value.diagnostics[0].code == "E901"
    r = _recipe('param lam = 0.3 learn\nmerge from base { "*" => base + lam * (a - base) }\n')
    with pytest.raises(MergelangError) as ei:
        r.learn(lambda s, b: 1.0, range(2))
    assert ei.value.diagnostics[0].code == "E903"
    with pytest.raises(MergelangError) as ei:
        r.learn(lambda s, b: s["norm"].sum(), [])
    assert ei.value.diagnostics[0].code == "E903"


def test_learn_on_a_string_param_is_E901() -> None:
    with pytest.raises(MergelangError) as ei:
        _recipe('param m = "x" learn\nmerge from base { "*" => base }\n')
    d = ei.value.diagnostics[0]
    assert d.code == "E901" and d.span is not None and d.span.text == '"x"'


def test_functional_call_helper_and_entropy() -> None:
    """ml.objectives.forward runs a module with merged tensors (no copy, differentiable)."""
    lin = torch.nn.Linear(4, 3)
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 4)
    out = ml.objectives.forward(lin, {"weight": w}, x)
    assert torch.allclose(out, x @ w.T + lin.bias)
    h = ml.objectives.entropy(out)
    p = torch.softmax(out, -1)
    assert torch.allclose(h, -(p * p.log()).sum(-1).mean())
    h.backward()
    assert w.grad is not None
    assert ml.objectives.accuracy(torch.tensor([[0.1, 0.9], [2.0, 1.0]]), torch.tensor([1, 1])) == 0.5


def test_forward_runs_a_transformers_skeleton_with_merged_tensors() -> None:
    """A merged state dict drives an HF model skeleton (no copy into the module): the logits
    equal those of the model with the tensors loaded."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    skeleton = transformers.LlamaForCausalLM(cfg).eval()
    other = transformers.LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().clone() for k, v in skeleton.state_dict().items()}
    merged = ml.merge("linear([a, b])", a=sd, b={k: v.detach() for k, v in other.state_dict().items()})
    ids = torch.tensor([[1, 5, 7, 3]])
    got = ml.objectives.forward(skeleton, merged, input_ids=ids).logits
    loaded = transformers.LlamaForCausalLM(cfg).eval()
    loaded.load_state_dict(merged)
    with torch.no_grad():
        want = loaded(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert all(torch.equal(skeleton.state_dict()[k], sd[k]) for k in sd)  # the skeleton is untouched


def _clamp_reference(targets, clamp: str, lr: float) -> float:
    """A plain-torch loop: Adam on one coefficient λ in [0, 1] of base + λ(a − base), the
    AdaMerging paper's code for clamp = "use" (torch.clamp(lambdas_raw, 0, 1) in forward), a
    projection after each step for clamp = "project". Returns the λ the merge would use."""
    raw = torch.nn.Parameter(torch.tensor(0.3))
    opt = torch.optim.Adam([raw], lr=lr)
    tvs = {k: A[k] - BASE[k] for k in BASE}
    for t in targets:
        lam = raw.clamp(0, 1) if clamp == "use" else raw
        loss = sum((BASE[k] + lam * tvs[k] - (BASE[k] + t * tvs[k])).pow(2).mean() for k in BASE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if clamp == "project":
            with torch.no_grad():
                raw.clamp_(0, 1)
    return float(raw.detach().clamp(0, 1))


@pytest.mark.parametrize("clamp", ["project", "use"])
def test_clamp_conventions_match_plain_torch_loops(clamp: str) -> None:
    """The optimum moves from 1.5 (outside [0, 1]) to 0.6. Projected, λ follows it back to 0.6;
    clamped where used (the paper's code), the raw λ has drifted past 1, where its gradient is
    0, so the merge keeps λ = 1."""
    targets = [1.5] * 60 + [0.6] * 200
    r = _recipe("param lam = 0.3 in [0, 1] learn\n"
                'merge from base { "*" => base + lam * (a - base) }\n')

    def loss(state, t):
        return sum((state[k] - (BASE[k] + t * (A[k] - BASE[k]))).pow(2).mean() for k in BASE)
    kw = {} if clamp == "project" else {"clamp": clamp}
    res = r.learn(loss, targets, lr=0.05, **kw)
    want = _clamp_reference(targets, clamp, 0.05)
    assert res.values["lam"] == pytest.approx(want, abs=1e-4)
    assert want == (pytest.approx(0.6, abs=1e-2) if clamp == "project" else 1.0)


def test_clamp_convention_is_checked() -> None:
    r = _recipe("param lam = 0.3 in [0, 1] learn\nmerge from base { \"*\" => base + lam * (a - base) }\n")
    with pytest.raises(MergelangError, match="clamp must be project or use"):
        r.learn(lambda s, b: s["norm"].sum(), [0], clamp="paper")
