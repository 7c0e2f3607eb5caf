"""Elaboration templates (lang/templates.py): a rule elaborated once per family of same-shaped
tensors and replayed for the others builds exactly the graph that elaborating each tensor
builds (differential: the graph's text with and without templates, after common-subexpression
elimination, since replays share the nodes no load flows into; and the optimized graph's)."""

from __future__ import annotations

import pytest
import torch

import mergelang as ml
from mergelang.ir.graph import format_graph
from mergelang.lang.blocks import BlockElaboration
from mergelang.passes.optimize import cse, dce


def _models() -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for k, name in enumerate(("base", "a", "b")):
        g = torch.Generator().manual_seed(k)
        sd = {f"model.layers.{i}.mlp.experts.{e}.w": torch.randn(6, 4, generator=g)
              for i in range(3) for e in range(4)}
        sd.update({f"model.layers.{i}.norm": torch.randn(4, generator=g) for i in range(3)})
        sd["model.embed"] = torch.randn(8, 4, generator=g)
        out[name] = sd
    return out


HEAD = 'model base = "<memory>"\nmodel a = "<memory>"\nmodel b = "<memory>"\n'
RECIPES = {
    "ties": 'merge from base { "*" => ties(base, [a, b], density = 0.5) }\n',
    "captures": ('merge from base {\n    "model.layers.{i}.mlp.experts.{e}.w" if e < 2 => slerp(a, b, t = i / 3)\n'
                 '    "model.layers.{i}.*" => linear([a, b], weights = [1, e])\n    "*" => base\n}\n'
                 .replace(", weights = [1, e]", "")),
    "dare_name_keyed": 'merge from base { "*" => dare_ties(base, [a, b], density = 0.5, seed = 1) }\n',
    "lines_by_name": 'merge from base { "*" => base + lines(a - base, 0.5, 0.5, 3) }\n',
    "named_outputs": ('merge "x" from base { "*" => linear([a, b]) }\nmodel x = output("x")\n'
                      'merge "y" from base { "*" => task_arithmetic(base, [x, b], lambda = 0.5) }\n'),
    "by_name": ('merge from base {\n    re"model\\\\.layers\\\\.(?P<i>\\\\d+)\\\\.mlp\\\\.experts\\\\.(?P<e>\\\\d+)\\\\.w" =>\n'
                '        linear([a, tensor(b, "model.layers." + str(i) + ".mlp.experts." + str(3 - e) + ".w")])\n'
                '    "*" => a\n}\n'),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_replayed_graph_equals_the_elaborated_one(name: str, monkeypatch) -> None:
    models = _models()
    src = HEAD + RECIPES[name]
    with_t = ml.compile(src, **models)
    monkeypatch.setattr(BlockElaboration, "_family", lambda self, *a: None)  # no templates
    without = ml.compile(src, **models)
    # replays share the family's tensor-independent nodes (constants and their arithmetic):
    # the graph elaborating each tensor builds, after common-subexpression elimination
    assert format_graph(dce(cse(with_t.compilation.graph))) == format_graph(dce(cse(without.compilation.graph)))
    assert format_graph(with_t.compilation.optimized) == format_graph(without.compilation.optimized)
    assert len(with_t.compilation.graph) <= len(without.compilation.graph)
    a, b = with_t.evaluate(), without.evaluate()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor)
                                        else all(torch.equal(a[k][t], b[k][t]) for t in a[k]) for k in a)


def test_a_family_is_elaborated_once(monkeypatch) -> None:
    from mergelang.lang.elaborate import Elaborator

    calls = []
    orig = Elaborator.eval

    def counting(self, e, env):
        if not self.stack:
            calls.append(self._tensor)
        return orig(self, e, env)
    monkeypatch.setattr(Elaborator, "eval", counting)
    ml.compile(HEAD + RECIPES["ties"], **_models()).close()
    # 3 shape families (experts 6x4, norms 4, embed 8x4): one elaboration each
    assert len(set(calls)) == 3


def test_replays_share_the_familys_constant_nodes(monkeypatch) -> None:
    """The 12 expert tensors of one family share one copy of ties' constants (weights, their
    reshapes, comparison constants) instead of one per tensor."""
    from mergelang.ir.ops import Op

    src = HEAD + RECIPES["ties"]

    def consts(g) -> int:
        return sum(1 for _, n in g.items() if n.op is Op.CONST)
    with_t = consts(ml.compile(src, **_models()).compilation.graph)
    monkeypatch.setattr(BlockElaboration, "_family", lambda self, *a: None)
    without = consts(ml.compile(src, **_models()).compilation.graph)
    assert with_t * 3 < without
