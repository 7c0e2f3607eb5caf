"""`tensor(model, name)` and `str(x)`: merging tensors that two checkpoints name differently
(vl-merging's modality-specific -> agnostic merge) and re-ordering experts."""

from __future__ import annotations

import pytest
import torch

import mergelang as ml

G = torch.Generator().manual_seed(0)


def test_renamed_layers_are_merged():
    lm = {f"model.layers.{i}.mlp.weight": torch.randn(3, 2, generator=G) for i in range(2)}
    vlm = {f"language_model.model.layers.{i}.mlp.weight": torch.randn(3, 2, generator=G) for i in range(2)}
    vlm["vision.patch.weight"] = torch.randn(4, generator=G)
    r = ml.compile('model lm = "x"\nmodel vlm = "y"\nmerge from lm {\n'
                   '  "model.layers.{i}.mlp.weight" => linear([lm, tensor(vlm, "language_model.model.layers." '
                   '+ str(i) + ".mlp.weight")])\n}', lm=lm, vlm=vlm)
    out = r.evaluate()
    r.close()
    for i in range(2):
        k = f"model.layers.{i}.mlp.weight"
        torch.testing.assert_close(out[k], (lm[k] + vlm["language_model." + k]) / 2)


def test_experts_reordered_by_a_param():
    a = {f"model.layers.0.mlp.experts.{e}.w1.weight": torch.full((2, 2), float(e)) for e in range(4)}
    r = ml.compile('model a = "x"\nparam perm = [2, 0, 3, 1]\nmerge from a {\n'
                   '  re"model\\.layers\\.(?P<i>\\d+)\\.mlp\\.experts\\.(?P<e>\\d+)\\.(?P<w>.+)" => '
                   'tensor(a, "model.layers." + str(i) + ".mlp.experts." + str(perm[e]) + "." + w)\n}', a=a)
    out = r.evaluate()
    r.close()
    for e, src in enumerate([2, 0, 3, 1]):
        assert torch.equal(out[f"model.layers.0.mlp.experts.{e}.w1.weight"], torch.full((2, 2), float(src)))


def test_missing_name_and_bad_arguments():
    a = {"model.x.weight": torch.ones(2)}
    for expr, code in (('tensor(a, "model.y.weight")', "E302"), ('tensor(a, 3)', "E201"),
                       ('tensor(3, "model.x.weight")', "E201"), ('a * 0 + tensor(a, str(a))', "E201")):
        with pytest.raises(ml.MergelangError) as info:
            ml.compile(f'model a = "x"\nmerge from a {{ "*" => {expr} }}', a=a)
        assert info.value.diagnostics[0].code == code, expr
    r = ml.compile('model a = "x"\nmerge from a { "*" => tensor(a, "model." + str(1.5) + "x.weight") * 0 + a }',
                   a={"model.1.5x.weight": torch.ones(2)})
    r.close()
