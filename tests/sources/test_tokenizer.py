"""option tokenizer_source (mergekit's tokenizer_source / tokenizer:): vocabulary rows mapped by
token to the output tokenizer, checked against a plain reference of mergekit's rules; the output
folder's tokenizer, config and chat template; E318 / W105."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelang as ml
from tokenizer_models import make_models

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("tok"))


def vocab_of(folder) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).get_vocab(with_added_tokens=True)


def reference_rows(models, base, out_vocab, size, name):
    """mergekit's PermutedVocabulary, written out plainly: each model's row for each output
    token; a missing token from the one model that has it, else zero if none, else the base's,
    else the mean of those that have it; padding rows each model's mean row."""
    tensors, vocabs = {}, {}
    for k, f in models.items():
        tensors[k] = load_file(str(Path(f) / "model.safetensors"))[name]
        vocabs[k] = {t: i for t, i in vocab_of(f).items() if i < tensors[k].shape[0]}
    out = {}
    for k in models:
        rows = []
        for tok, _ in sorted(out_vocab.items(), key=lambda kv: kv[1]):
            if tok in vocabs[k]:
                rows.append(tensors[k][vocabs[k][tok]])
                continue
            have = [m for m in models if tok in vocabs[m]]
            if len(have) == 1:
                rows.append(tensors[have[0]][vocabs[have[0]][tok]])
            elif not have:
                rows.append(torch.zeros(tensors[k].shape[1:]))
            elif base in have:
                rows.append(tensors[base][vocabs[base][tok]])
            else:
                rows.append(sum(tensors[m][vocabs[m][tok]] for m in have) / len(have))
        t = torch.stack(rows)
        if size > len(rows):
            t = torch.cat([t, t.mean(0, keepdim=True).expand(size - len(rows), -1)])
        out[k] = t
    return out


def run(models, tmp_path, source, pad=None, extra=""):
    text = "".join(f'model {k} = "{v}"\n' for k, v in models.items())
    text += f'option tokenizer_source = "{source}"\n' + (f"option pad_to_multiple_of = {pad}\n" if pad else "")
    text += extra + 'merge from base { "*" => linear([base, a, b]) }\n'
    r = ml.compile(text)
    try:
        r.run(tmp_path / "out")
        return r.warnings
    finally:
        r.close()


@pytest.mark.parametrize("source,pad", [("base", None), ("base", 8), ("a", None), ("union", 8),
                                        ("union", None)])
def test_rows_follow_mergekit_rules(models, tmp_path, source, pad):
    run(models, tmp_path, source, pad)
    out = tmp_path / "out"
    got = load_file(str(next(out.glob("*.safetensors"))))
    vocab = vocab_of(out)
    if source == "base":
        assert vocab == vocab_of(models["base"])  # 42 tokens: the 6 padding rows are dropped
    elif source == "a":
        assert vocab == vocab_of(models["a"])
    else:  # the base's ids, then the others' tokens it lacks, then added tokens
        assert {t: i for t, i in vocab.items() if i < 42} == vocab_of(models["base"])
        assert set(vocab) == set(vocab_of(models["base"])) | {"x1", "x2", "y1", "<pad>"}
        assert vocab["<pad>"] == len(vocab) - 1
    size = len(vocab) if not pad else -(-len(vocab) // pad) * pad
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == size
    for name in VOCAB_TENSORS:
        per_model = reference_rows(models, "base", vocab, size, name)
        want = sum(per_model.values()) / 3
        assert got[name].shape == (size, want.shape[1])
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-6)
    other = "model.layers.0.mlp.up_proj.weight"  # non-vocabulary tensors are merged as stored
    want = sum(load_file(str(Path(f) / "model.safetensors"))[other] for f in models.values()) / 3
    torch.testing.assert_close(got[other], want)


def test_output_loads_in_transformers_with_the_chat_template(models, tmp_path):
    run(models, tmp_path, "union", 8, 'option chat_template = "auto"\n')
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok) == 46 and tok.convert_tokens_to_ids("y1") == vocab_of(tmp_path / "out")["y1"]
    assert tok.chat_template == "T-{{ a }}"  # the most common of the models' templates
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape == (48, 8)


def test_a_literal_chat_template_and_stripping(models, tmp_path):
    run(models, tmp_path, "base", None, 'option chat_template = "{{ messages }}"\n')
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ messages }}"
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg


def test_base_tokens_past_vocab_size_are_stripped(models, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(models["base"], base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["vocab_size"] = 30  # only ids < 30 are the model's tokens
    (base / "config.json").write_text(json.dumps(cfg))
    run({**models, "base": str(base)}, tmp_path, "base")
    vocab = vocab_of(tmp_path / "out")
    assert sorted(vocab.values()) == list(range(30)) and "t35" not in vocab


def test_E318_unknown_tokenizer_source(models):
    text = "".join(f'model {k} = "{v}"\n' for k, v in models.items())
    with pytest.raises(ml.MergelangError) as info:
        ml.compile(text + 'option tokenizer_source = "c"\nmerge from base { "*" => linear([base, a]) }\n')
    d = info.value.diagnostics[0]
    assert d.code == "E318" and "base" in d.message and d.span is not None


def test_W105_a_model_without_a_tokenizer(models, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(models["b"], b)
    (b / "tokenizer.json").unlink()
    warnings = run({**models, "b": str(b)}, tmp_path, "base")
    assert "W105" in [w.code for w in warnings]


def test_E318_reference_without_a_tokenizer(models, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(models["base"], base)
    (base / "tokenizer.json").unlink()
    text = "".join(f'model {k} = "{v}"\n' for k, v in {**models, "base": str(base)}.items())
    with pytest.raises(ml.MergelangError) as info:
        ml.compile(text + 'option tokenizer_source = "base"\nmerge from base { "*" => base }\n')
    assert info.value.diagnostics[0].code == "E318"
