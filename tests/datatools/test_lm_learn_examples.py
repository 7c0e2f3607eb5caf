"""examples/lm_learn: AdaMerging (entropy on unlabeled text) and aTLAS-style few-shot merging
(next-token cross-entropy) on a transformers causal LM with `mergelang learn`, on tiny Llamas
written here. The objective, recomputed independently with transformers on the written output,
is lower than at the recipe's starting coefficients (plain-torch task arithmetic)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergelang.cli import main as cli_main

transformers = pytest.importorskip("transformers")

import data_models as dm  # noqa: E402

EX = Path(__file__).resolve().parents[2] / "examples" / "lm_learn"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm_learn")
    base = dm.save_llama(root / "base", 0)
    return {"base": base, "a": dm.save_llama(root / "a", 1, base=base, scale=0.3),
            "b": dm.save_llama(root / "b", 2, base=base, scale=0.3)}


def batches(folder: Path, path: Path) -> list[dict]:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return [{"input_ids": torch.tensor([tok(line)["input_ids"]])}
            for line in path.read_text().splitlines() if line.strip()]


def entropy(model, bs) -> float:
    """Mean next-token entropy over every real position of every text (one text per batch)."""
    with torch.no_grad():
        logp = torch.cat([torch.log_softmax(model(**b).logits[0], -1) for b in bs])
    return float(-(logp.exp() * logp).sum(-1).mean())


def cross_entropy(model, bs) -> float:
    with torch.no_grad():
        return sum(float(model(**b, labels=b["input_ids"]).loss) for b in bs) / len(bs)


def start_model(models) -> torch.nn.Module:
    """Task arithmetic at the recipes' starting coefficients (0.3 each), in plain torch."""
    sds = {k: transformers.AutoModelForCausalLM.from_pretrained(str(v)).state_dict() for k, v in models.items()}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(models["base"])).eval()
    model.load_state_dict({k: sds["base"][k] + 0.3 * (sds["a"][k] - sds["base"][k])
                           + 0.3 * (sds["b"][k] - sds["base"][k]) for k in sds["base"]})
    return model


@pytest.mark.parametrize("recipe,loss,data,measure,text", [
    ("adamerging.mrg", "entropy_loss", "unlabeled", entropy, "unlabeled.txt"),
    ("fewshot.mrg", "cross_entropy_loss", "fewshot", cross_entropy, "fewshot.txt"),
])
def test_learned_merge_lowers_its_objective(models, tmp_path, monkeypatch, recipe, loss, data,
                                            measure, text):
    monkeypatch.setenv("MERGELANG_LM", str(models["base"]))
    res = CliRunner().invoke(cli_main, [
        "learn", str(EX / recipe), "--loss", f"{EX / 'losses.py'}:{loss}",
        "--data", f"{EX / 'losses.py'}:{data}", "-o", str(tmp_path / "out"), "--steps", "25",
        "--lr", "0.05", "-q", *[f"--set={k}={v}" for k, v in models.items()]])
    assert res.exit_code == 0, res.output
    first, last = map(float, re.search(r"loss (\S+) -> (\S+) in", res.output).groups())
    assert last < first
    learned = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    bs = batches(models["base"], EX / text)
    assert measure(learned, bs) < measure(start_model(models), bs) - 1e-4
