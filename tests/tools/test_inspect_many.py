"""`mergelang inspect` on checkpoints of many tiny tensors (tools/inspect_small.py: runs of
small tensors in one numba call; tools/inspect_totals.py: the aggregates as a ledger summed at
the end): every number equals the per-tensor path's bit for bit, and a plain torch computation
at rel 1e-9; tensor-name parsing equals the regular-expression form."""

from __future__ import annotations

import gc
import json
import math
import random
import re

import pytest
import torch
from safetensors.torch import save_file
from test_inspect import close, ref_group

import mergelang as ml
from mergelang.tools import inspect_small
from mergelang.tools.inspect import fused_experts, measure_tensor
from mergelang.tools.inspect_stats import Group, location, tensor_group
from mergelang.tools.report_folder import dumps

LABELS = ["m0", "m1"]


def build(root) -> tuple[dict, dict]:
    """base + 2 models: 300 tiny bf16 expert tensors (5 layers x 20 experts x 3), then runs that
    break a batch: float32 / float16 / float64, 0-dim scalars, mixed trailing shapes, a tensor
    stored in other dtypes by the models, an empty one, one over SMALL entries, a fused [E, ...]
    experts tensor, a tensor equal to the base in one model."""
    g = torch.Generator().manual_seed(3)
    base: dict[str, tuple[torch.Tensor, torch.dtype]] = {}
    for layer in range(5):
        for e in range(20):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                base[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = (torch.randn(4, 8, generator=g),
                                                                               torch.bfloat16)
    p = "model.layers.5."
    for i, dt in enumerate((torch.float32, torch.float32, torch.float16, torch.float64, torch.float64)):
        base[p + f"mlp.norm{i}.weight"] = (torch.randn(16 + i, generator=g), dt)
    for i in range(3):
        base[p + f"scale{i}"] = (torch.randn((), generator=g), torch.float32)
    for i, shape in enumerate(((4, 8), (4, 6), (5,), (2, 3, 4))):
        base[p + f"mixed{i}.weight"] = (torch.randn(shape, generator=g), torch.float32)
    base[p + "mixed_dtype.weight"] = (torch.randn(6, 6, generator=g), torch.float32)
    base[p + "empty.weight"] = (torch.zeros(0, 4), torch.float32)
    base[p + "big.weight"] = (torch.randn(130, 130, generator=g), torch.bfloat16)
    base[p + "mlp.experts.gate_up_proj"] = (torch.randn(3, 4, 8, generator=g), torch.bfloat16)
    base["lm_head.weight"] = (torch.randn(8, 4, generator=g), torch.bfloat16)
    sds: dict[str, dict[str, torch.Tensor]] = {"base": {n: t.to(dt) for n, (t, dt) in base.items()}}
    for k, lab in enumerate(LABELS):
        sd = {}
        for n, (t, dt) in base.items():
            d = torch.randn(t.shape, generator=g) * 0.01 * (k + 1)
            d[torch.rand(t.shape, generator=g) < 0.3] = 0
            x = t if (k == 1 and n.endswith("experts.7.up_proj.weight")) else t + d
            sd[n] = x.to(torch.bfloat16 if n.endswith("mixed_dtype.weight") else dt)
        sds[lab] = sd
    for lab, sd in sds.items():
        (root / lab).mkdir()
        save_file(sd, str(root / lab / "model.safetensors"))
    return sds, {lab: {n: t.double() for n, t in sd.items()} for lab, sd in sds.items()}


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    return (root, *build(root))


def test_batched_equals_per_tensor_and_plain_torch(many, monkeypatch):
    root, stored, sds = many
    batched = []
    real = inspect_small.batch_sums
    monkeypatch.setattr(inspect_small, "batch_sums",
                        lambda group, *a: batched.append(len(group)) or real(group, *a))
    r = ml.inspect(root / "base", [root / lab for lab in LABELS], device="cpu")
    assert sum(batched) >= 300 and len(batched) >= 6, batched  # the runs: bf16, f32, f16, f64, ...
    names = list(r["tensors"])  # the base's file order (safetensors: by dtype, then name)
    assert sorted(names) == sorted(stored["base"])
    # the per-tensor path (one tensor_group per tensor) gives the same entries, bit for bit
    for n in names:
        want, _, _, _ = measure_tensor(n, [stored[k][n] for k in ("base", *LABELS)], LABELS, None,
                                       torch.device("cpu"), location(n)[2])
        got = {k: v for k, v in r["tensors"][n].items() if k in want}
        assert json.dumps(got) == json.dumps(want), n
    # and the aggregates are the tensors' Groups added one after the other (as before the ledger)
    want = sequential_totals(names, stored)
    for kind in ("total", "layers", "families", "experts"):
        assert json.dumps(r[kind]) == json.dumps(want[kind]), kind
    # a plain torch computation
    floats = [n for n in names if sds["base"][n].numel()]
    for n in floats[::7] + floats[-14:]:
        if not n.endswith("gate_up_proj"):
            close(r["tensors"][n], ref_group(sds, LABELS, [n]), n)
    fused = "model.layers.5.mlp.experts.gate_up_proj"  # its statistics: those of its 3 slices
    slices = {lab: sd | {f"slice{e}": sd[fused][e] for e in range(3)} for lab, sd in sds.items()}
    unfused = [n for n in floats if n != fused]
    close(r["total"], ref_group(slices, LABELS, unfused + ["slice0", "slice1", "slice2"]), "total")
    close(r["experts"]["2"], ref_group(slices, LABELS, [n for n in floats if ".experts.2." in n]
                                       + ["slice2"]), "expert 2")
    layer2 = [n for n in floats if n.startswith("model.layers.2.")]
    close(r["layers"]["2"], ref_group(sds, LABELS, layer2), "layer 2")
    assert r["families"]["mlp.experts.{}.up_proj.weight"]["tensors"] == 100
    zero = r["tensors"]["model.layers.0.mlp.experts.7.up_proj.weight"]["pairs"]["m0~m1"]
    assert zero["cosine"] is None and zero["both_nonzero"] == 0


def sequential_totals(names: list[str], stored: dict) -> dict:
    """The report's aggregates by adding each tensor's Group (and each expert slice's) in order."""
    n = len(LABELS)
    total, layers, families, experts = Group.empty(n), {}, {}, {}
    cpu = torch.device("cpu")
    for name in names:
        ts = [stored[k][name] for k in ("base", *LABELS)]
        layer, family, expert = location(name)
        per_expert = []
        if expert is None and fused_experts(name, ts[0]):
            per_expert = [tensor_group(ts[0][e], [t[e] for t in ts[1:]], None, cpu)[0]
                          for e in range(ts[0].shape[0])]
            g = Group.empty(n)
            for pe in per_expert:
                g.add(pe)
            g.tensors = 1
        else:
            g = tensor_group(ts[0], ts[1:], None, cpu)[0]
        for e, pe in enumerate(per_expert):
            experts.setdefault(e, Group.empty(n)).add(pe)
        total.add(g)
        if layer is not None:
            layers.setdefault(layer, Group.empty(n)).add(g)
        families.setdefault(family, Group.empty(n)).add(g)
        if expert is not None:
            experts.setdefault(expert, Group.empty(n)).add(g)
    return {"total": total.to_json(LABELS),
            "layers": {str(k): layers[k].to_json(LABELS) for k in sorted(layers)},
            "families": {k: v.to_json(LABELS) for k, v in families.items()},
            "experts": {str(k): experts[k].to_json(LABELS) for k in sorted(experts)}}


def test_gc_state_is_restored(many):
    root = many[0]
    assert gc.isenabled()
    ml.inspect(root / "base", [root / lab for lab in LABELS], device="cpu")
    assert gc.isenabled()
    gc.disable()
    try:
        ml.inspect(root / "base", [root / lab for lab in LABELS], device="cpu")
        assert not gc.isenabled()
    finally:
        gc.enable()


_NUM = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def location_by_regex(name: str):
    nums = [int(m.group()) for m in _NUM.finditer(name)]
    tpl = _NUM.sub("{}", name)
    m = re.search(r"(?:^|\.)experts\.(\d+)\.", name)
    expert = int(m.group(1)) if m else None
    if not nums:
        return None, name, expert
    return nums[0], tpl.partition("{}")[2].lstrip(".") or tpl, expert


def test_location_equals_the_regular_expressions():
    rng = random.Random(0)
    atoms = ["", "experts", "7", "03", "a1", "1a", "{}", "layers", "w", "\u0663", "\u00b2", " 4", "3\n", "\n"]
    names = ["lm_head.weight", "7", "experts.3", "experts.3.w", "3.", ".3", "..", "",
             "model.layers.3.mlp.experts.7.down_proj.weight"]
    names += [".".join(rng.choice(atoms) for _ in range(rng.randint(1, 6))) for _ in range(5000)]
    for n in names:
        assert location(n) == location_by_regex(n), repr(n)


def test_dumps_writes_non_finite_as_null():
    finite = {"tensors": {}, "a": [1.5, 2], "b": {"c": 0.25}}
    assert dumps(finite) == json.dumps(finite, indent=1) + "\n"
    bad = {"tensors": {}, "a": [math.nan, 1.0], "b": {"c": math.inf}}
    assert json.loads(dumps(bad)) == {"tensors": {}, "a": [None, 1.0], "b": {"c": None}}


@pytest.mark.parametrize("shapes", [[()] * 4, [(), (3,)], [(3,), ()], [(4, 8), (2, 8), (8,)],
                                    [(2, 3, 4), (1, 3, 4)], [(5,), (7,), (1,)]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_batch_sums_equal_one_tensor_at_a_time(shapes, dtype):
    from mergelang.tools.inspect_stats import FRACTIONS

    g = torch.Generator().manual_seed(len(shapes))
    group = []
    for shape in shapes:
        b = torch.randn(shape, generator=g)
        group.append([b.to(dtype)] + [(b + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(2)])
    d = inspect_small.batch_dtype(group[0])
    assert d == (dtype if dtype in (torch.bfloat16, torch.float64) else torch.float32)
    numel, ms, en, ps = inspect_small.batch_sums(group, d, FRACTIONS)
    for t, ts in enumerate(group):
        one = tensor_group(ts[0], ts[1:], None, torch.device("cpu"))[0]
        assert numel[t] == ts[0].numel()
        for j, m in enumerate(one.models):
            assert [float(v) for v in ms[t, j]] == [m.ss, m.base_ss, m.max_abs, m.zeros]
            assert [float(v) for v in en[t, j]] == m.energy
        for p, pair in enumerate(one.pairs.values()):
            assert [float(v) for v in ps[t, p]] == [pair.dot, pair.agree, pair.both]
