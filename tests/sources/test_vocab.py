"""Vocabulary mismatches: a clear diagnostic naming every model's shape, and
`option resize_vocab = true` (truncate, or pad with the reference's rows)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mergelang as ml  # noqa: E402
from test_mergekit_import import _tensors  # noqa: E402

VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vocab")
    base = _tensors(0)  # 16 tokens
    save_file(base, str(root / "base.safetensors"))
    for name, rows, seed in (("big", 20, 1), ("small", 12, 2)):
        t = _tensors(seed, base)
        g = torch.Generator().manual_seed(10 + seed)
        for v in VOCAB_NAMES:
            t[v] = torch.randn(rows, 8, generator=g)
        save_file(t, str(root / f"{name}.safetensors"))
    return root


def _recipe(folder: Path, rule: str, extra: str = "") -> str:
    return (f'model base = "{folder}/base.safetensors"\nmodel big = "{folder}/big.safetensors"\n'
            f'model small = "{folder}/small.safetensors"\n{extra}\nmerge from base {{\n    {rule}\n}}\n')


def test_shape_error_names_every_vocabulary(folder):
    with pytest.raises(ml.MergelangError) as exc:
        ml.compile(_recipe(folder, '"*" => linear([base, big, small])'))
    d = exc.value.diagnostics[0]
    assert d.code == "E202"
    text = d.render()
    assert "vocabulary sizes differ for `lm_head.weight`: `base` [16, 8], `big` [20, 8], " \
           "`small` [12, 8]" in text
    assert "option resize_vocab = true" in d.help and '"lm_head.weight" => base' in d.help
    with pytest.raises(ml.MergelangError) as exc:
        ml.compile(_recipe(folder, '"*" => big'))
    assert exc.value.codes == ["E207"] and "`big` [20, 8]" in exc.value.render()


def test_resize_vocab_truncates_and_pads_from_the_reference(folder):
    from safetensors.torch import load_file

    r = ml.compile(_recipe(folder, '"*" => linear([base, big, small])', "option resize_vocab = true"))
    assert [w.code for w in r.warnings] == ["W104", "W104"]
    assert "truncated to [16, 8]" in r.warnings[0].message
    assert "padded to [16, 8]" in r.warnings[1].message
    out = r.evaluate()
    r.close()
    sd = {n: load_file(str(folder / f"{n}.safetensors")) for n in ("base", "big", "small")}
    for v in VOCAB_NAMES:
        small = torch.cat([sd["small"][v], sd["base"][v][12:]])
        want = (sd["base"][v] + sd["big"][v][:16] + small) / 3
        torch.testing.assert_close(out[v], want, rtol=1e-6, atol=1e-6)
    other = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(out[other], (sd["base"][other] + sd["big"][other] + sd["small"][other]) / 3)
