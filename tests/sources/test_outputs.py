"""Block outputs used as models (`model s = output("NAME")`): one graph, the intermediate shared,
equal to running the two merges one after the other; E316 / E317."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mergelang as ml
from helpers import make_sd, write_model

SHAPES = {"w": (6, 4), "b": (4,), "n": (3,)}


@pytest.fixture()
def folders(tmp_path):
    out = {}
    for name, seed in (("base", 0), ("a", 1), ("b", 2), ("c", 3)):
        sd = make_sd(seed, SHAPES)
        sd["ids"] = torch.arange(5)  # an integer tensor: copied from the reference
        out[name] = write_model(tmp_path / name, sd, {"architectures": ["X"]})
    return out


def header(folders, *names):
    return "".join(f'model {n} = "{folders[n]}"\n' for n in names)


STAGED = '''model stage1 = output("stage1")
merge "stage1" from base { "*" => ties(base, [a, b], density = 0.5) }
merge "final" from base { "*" => slerp(stage1, c, t = 0.3) }
'''


def test_output_as_model_equals_two_runs(folders, tmp_path):
    r = ml.compile(header(folders, "base", "a", "b", "c") + STAGED)
    try:
        got = r.evaluate()
    finally:
        r.close()
    first = ml.compile(header(folders, "base", "a", "b") +
                       'merge from base { "*" => ties(base, [a, b], density = 0.5) }')
    first.run(tmp_path / "s1")
    first.close()
    second = ml.compile(header(folders, "base", "c") + f'model s1 = "{tmp_path / "s1"}"\n' +
                        'merge from base { "*" => slerp(s1, c, t = 0.3) }')
    want = second.evaluate()
    second.close()
    assert set(got) == {"stage1", "final"}
    for k in want:
        assert torch.equal(got["final"][k], want[k]), k
    assert torch.equal(got["final"]["ids"], torch.arange(5))


def test_the_intermediate_is_computed_once(folders):
    r = ml.compile(header(folders, "base", "a", "b", "c") + STAGED)
    try:
        plan = r.emit("plan")
    finally:
        r.close()
    # stage1's ties runs once per tensor (one top-k selection for each of w, b, n), and final's
    # slerp reads stage1's value, not a stored model
    assert plan.count("= topk_mask") == 3
    assert "load stage1" not in plan and plan.count("load c[") == 3


def test_run_writes_both_outputs(folders, tmp_path):
    r = ml.compile(header(folders, "base", "a", "b", "c") + STAGED)
    try:
        r.run(tmp_path / "out")
    finally:
        r.close()
    for name in ("stage1", "final"):
        (shard,) = (tmp_path / "out" / name).glob("*.safetensors")
        assert set(load_file(str(shard))) == {"w", "b", "n", "ids"}


def test_output_can_be_a_merge_from_model(folders):
    text = header(folders, "base", "a", "c") + '''model s1 = output("s1")
merge "s1" from base { "*" => linear([a, base]) }
merge "s2" from s1 { "*" => linear([s1, c]) }
'''
    r = ml.compile(text)
    try:
        got = r.evaluate()
    finally:
        r.close()
    for k in SHAPES:
        a, base, c = (load_file(str(folders[n] / "model.safetensors"))[k] for n in ("a", "base", "c"))
        torch.testing.assert_close(got["s2"][k], ((a + base) / 2 + c) / 2)


def test_E316_unknown_output(folders):
    text = header(folders, "base", "a") + '''model s1 = output("stage_1")
merge "stage1" from base { "*" => linear([a, base]) }
merge "final" from base { "*" => linear([s1, a]) }
'''
    with pytest.raises(ml.MergelangError) as info:
        ml.compile(text)
    d = info.value.diagnostics[0]
    assert d.code == "E316" and "stage1" in (d.help or "")


def test_E317_an_output_that_uses_itself(folders):
    text = header(folders, "base", "a") + '''model s1 = output("s1")
merge "s1" from base { "*" => linear([a, s1]) }
'''
    with pytest.raises(ml.MergelangError) as info:
        ml.compile(text)
    assert {d.code for d in info.value.diagnostics if d.is_error} == {"E317"}


def test_E317_two_outputs_in_a_cycle(folders):
    text = header(folders, "base", "a") + '''model x = output("x")
model y = output("y")
merge "x" from base { "*" => linear([a, y]) }
merge "y" from base { "*" => linear([a, x]) }
'''
    with pytest.raises(ml.MergelangError) as info:
        ml.compile(text)
    assert "E317" in {d.code for d in info.value.diagnostics}


def test_E317_merge_from_models_in_a_cycle(folders):
    text = header(folders, "a") + '''model x = output("x")
model y = output("y")
merge "x" from y { "*" => a }
merge "y" from x { "*" => a }
'''
    with pytest.raises(ml.MergelangError) as info:
        ml.compile(text)
    assert "E317" in {d.code for d in info.value.diagnostics}


def test_output_inside_a_rule_is_refused(folders):
    text = header(folders, "base") + 'merge from base { "*" => output("x") }\n'
    with pytest.raises(ml.MergelangError) as info:
        ml.compile(text)
    assert [d.code for d in info.value.diagnostics if d.is_error][0] == "E201"
