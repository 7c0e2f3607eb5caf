"""`mergelang stats MODEL --data DATA --kind gram|fisher -o OUT` and `ml.stats(...)`: the sidecar
statistics `regmean` and `fisher` read, computed with forward (and backward) passes over data.

Conventions (FusionBench's `RegMeanAlgorithm` and `FisherMergingAlgorithm`, so that
`regmean([a, b], [ga, gb], alpha = r)` equals FusionBench's RegMean with
`reduce_non_diagonal_ratio = r` on the same data, and `fisher` its Fisher merging):

* gram: for every `torch.nn.Linear` N whose weight `N.weight` (out x in) is a checkpoint tensor,
  G = (1/n) sum_t x_t x_t^T (in x in) over the n input rows x_t the layer saw: one row per real
  (non-padding) token for sequence inputs, one per example for pooled inputs (a classifier
  head). This is FusionBench's running average of X^T X / rows, except that FusionBench also
  counts padded positions (its batches are padded; here padding never counts). The mean, not
  the sum: every model's Gram is on the same scale whatever its number of tokens, as there.
  Saved as `N.weight`, float32. Layers that read the same input tensor one after another (q/k/v,
  gate/up) share one X^T X product. Layers never called on the data are left out (listed in the
  JSON). Transformers' GPT-2 `Conv1D` layers are not `nn.Linear` and get no Gram.
* fisher: F = (1/N) sum_batches (d/dθ sum_{examples in batch} log p(y | x))^2 for every
  parameter θ, N examples: FusionBench's estimator; with `batch_size=1` (the default for
  fisher) it is the per-example empirical Fisher, the mean over examples of the squared
  gradient. y are the data's own labels: every next token of a causal LM (padding excluded;
  `labels` with -100 from FILE.py batches), or a sequence classifier's `label`. (FusionBench's
  classification variant weights the classes by the model's predicted probabilities instead.)
  Saved under each weight's checkpoint name, float32.

OUT is a sidecar folder (shards + model.safetensors.index.json + mergelang_stats.json: model,
data, its sha256, kind, counts), written atomically with the guards of `run`. With a memory
budget smaller than all the Grams together, the layers are split into groups that fit and the
data is read once per group (W145).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from mergelang.data.inputs import (DEFAULT_SEQ_LEN, Counts, Data, LoadedModel, batches, fail, forward_errors,
                                   load_data, load_model)
from mergelang.data.sidecar import STATS_FILE, Stats, check_out, data_path, say, write_stats  # noqa: F401  (public here too)
from mergelang.diagnostics import Diagnostic, warning

KINDS = ("gram", "fisher")


def stats(model: str | Path, data: str | Path, kind: str = "gram", out: str | Path | None = None, *,
          max_examples: int | None = None, batch_size: int | None = None,
          seq_len: int = DEFAULT_SEQ_LEN, device: str = "auto", memory_budget: int | str | None = None,
          field: str = "text", force: bool = False, progress: bool = False,
          log: Callable[[Diagnostic], None] | None = None, groups: Any = (), module: Any = None) -> Stats:
    """Compute `kind` ("gram" or "fisher") statistics of `model` on `data` (see the module
    docstring); write them to the sidecar folder `out` when given. `kind="correlation"` with
    `model = [a, b]` (and `groups`, `module`): data/correlation.py."""
    from mergelang.ir.types import parse_bytes

    if kind == "correlation":
        from mergelang.data.correlation import correlation

        if memory_budget is not None:
            raise fail("E965", "memory_budget applies to kind gram, not correlation")
        return correlation(model, data, out, groups=groups, module=module, max_examples=max_examples,  # type: ignore[return-value]
                           batch_size=batch_size, seq_len=seq_len, device=device, field=field,
                           force=force, progress=progress, log=log)
    if kind not in KINDS:
        raise fail("E965", f"unknown statistics kind {kind!r}", f"kinds: {', '.join(KINDS)}")
    for name, v, lo in (("max_examples", max_examples, 1), ("batch_size", batch_size, 1),
                        ("seq_len", seq_len, 2)):
        if v is not None and (not isinstance(v, int) or v < lo):
            raise fail("E965", f"{name} must be an integer >= {lo}, got {v!r}")
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    dev = _device(device)
    if out is not None:
        check_out(Path(out), protected(model, data), force)
    d = load_data(data, field)
    lm = load_model(model, dev)
    bs = batch_size or (1 if kind == "fisher" else 8)
    t0 = time.perf_counter()
    counts = Counts()
    diags: list[Diagnostic] = []
    if kind == "gram":
        tensors, extra = _grams(lm, d, dev, bs, seq_len, max_examples, budget, counts, progress, diags, log)
    else:
        tensors, extra = _fisher(lm, d, dev, bs, seq_len, max_examples, counts, progress)
    if counts.examples == 0:
        raise fail("E961", f"data {d.source} gave no examples")
    if counts.tokens == 0:  # empty texts: the statistics would be all zeros
        raise fail("E961", f"data {d.source}: its {counts.examples} examples hold no tokens",
                   "give examples with text")
    if counts.truncated:
        diags.append(say(log, warning("W146", f"{counts.truncated} of {counts.examples} examples "
                                       f"are longer than --seq-len {seq_len} tokens: truncated",
                                       None, "raise --seq-len to use whole examples")))
    info = {"format": "mergelang-stats", "kind": kind, "model": str(model), "data": str(data),
            "data_sha256": d.digest, "examples": counts.examples, "tokens": counts.tokens,
            "batch_size": bs, "seq_len": seq_len, "tensors": len(tensors),
            "seconds": round(time.perf_counter() - t0, 3), **extra}
    res = Stats(kind, tensors, info, warnings=diags)
    if out is not None:
        res.path = write_stats(res, Path(out), force, protected(model, data))
    return res


def _device(name: str) -> Any:
    from mergelang.runtime.executor import resolve_device

    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as exc:
        raise fail("E402", str(exc)) from None


def protected(model: Any, data: Any) -> list[Path]:
    """What the output may not be, contain or lie inside: the model folder (for a Hugging Face
    cache snapshot, its whole cache repository) and the data."""
    from mergelang.data.inputs import model_folder
    from mergelang.io.inputs import model_root

    folder = model_folder(model)
    return [folder, model_root(folder), data_path(data)]


def _bar(progress: bool, total: int | None, kind: str) -> Any:
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="ex", desc=kind, disable=not progress or None, file=sys.stderr,
                leave=True)


def _total(d: Data, max_examples: int | None) -> int | None:
    if d.texts is None:
        return max_examples
    return len(d.texts) if max_examples is None else min(len(d.texts), max_examples)


# ----------------------------------------------------------------------------------------- gram


def _linears(lm: LoadedModel) -> list[tuple[str, Any, str]]:
    """(module name, module, checkpoint name of its weight) of every nn.Linear in the checkpoint."""
    import torch

    out = []
    for name, mod in lm.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name + ".weight" in lm.names:
            out.append((name, mod, lm.names[name + ".weight"]))
    return out


def _groups(layers: list[tuple[str, Any, str]], budget: int | None) -> list[list[tuple[str, Any, str]]]:
    """Layers in groups whose Grams (float32) fit in `budget` (one group without a budget)."""
    if budget is None:
        return [layers]
    groups: list[list[tuple[str, Any, str]]] = [[]]
    used = 0
    for layer in layers:
        nbytes = layer[1].in_features ** 2 * 4
        if groups[-1] and used + nbytes > budget:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += nbytes
    return groups


def _grams(lm: LoadedModel, d: Data, dev: Any, bs: int, seq_len: int, max_examples: int | None,
           budget: int | None, counts: Counts, progress: bool, diags: list[Diagnostic],
           log: Callable[[Diagnostic], None] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from mergelang.ir.types import format_bytes

    layers = _linears(lm)
    if not layers:
        raise fail("E963", f"model {lm.folder} has no linear layer (torch.nn.Linear) whose weight "
                   "is a checkpoint tensor: nothing to compute a Gram matrix for")
    groups = _groups(layers, budget)
    if len(groups) > 1:
        if d.batches is not None and iter(d.batches) is d.batches:
            raise fail("E965", f"the Gram matrices ({format_bytes(sum(m.in_features ** 2 * 4 for _, m, _ in layers))}) "
                       f"exceed --memory-budget, which needs {len(groups)} passes over the data, "
                       f"but --data {d.source} is a one-shot iterator",
                       "make BATCHES a list (or a function returning a fresh iterable), or raise "
                       "--memory-budget")
        total = sum(m.in_features ** 2 * 4 for _, m, _ in layers)
        diags.append(say(log, warning(
            "W145", f"the Gram matrices take {format_bytes(total)}, more than --memory-budget "
            f"{format_bytes(budget or 0)}: computed in {len(groups)} passes over the data, one per "
            "group of layers", None, "raise --memory-budget for fewer passes")))
    out: dict[str, Any] = {}
    unused: list[str] = []
    state: dict[str, Any] = {}
    for group in groups:
        acc = {ck: torch.zeros(m.in_features, m.in_features, device=dev) for _, m, ck in group}
        rows = {ck: 0 for _, m, ck in group}

        def hook_for(ck: str) -> Callable[..., None]:
            def hook(mod: Any, args: tuple, output: Any) -> None:
                x = args[0]
                last = state.get("last")
                if last is not None and last[0] is x:  # q/k/v (gate/up) read one tensor: once
                    acc[ck] += last[1]
                    rows[ck] += last[2]
                    return
                mask = state["mask"]
                flat = x.detach()
                flat = flat[mask] if flat.shape[:-1] == mask.shape else flat.reshape(-1, flat.shape[-1])
                flat = flat.float()
                xtx = flat.T @ flat
                acc[ck] += xtx
                rows[ck] += flat.shape[0]
                state["last"] = (x, xtx, flat.shape[0])  # held until the next input: no reuse
            return hook

        handles = [m.register_forward_hook(hook_for(ck)) for _, m, ck in group]
        counts.examples = counts.tokens = counts.truncated = 0
        try:
            with torch.no_grad(), _bar(progress, _total(d, max_examples), "gram") as bar:
                for b in batches(d, lm.tokenizer, dev, bs, seq_len, max_examples, counts):
                    state["mask"] = b.mask
                    state["last"] = None
                    with forward_errors():
                        lm.model(**b.inputs)
                    state["last"] = None
                    bar.update(b.size)
        finally:
            for h in handles:
                h.remove()
        for _, m, ck in group:
            if rows[ck]:
                out[ck] = (acc[ck] / rows[ck]).cpu()
            else:
                unused.append(ck)
    return out, {"passes": len(groups), "unused_layers": unused,
                 "normalization": "mean over input rows (real tokens): G = X^T X / rows"}


# --------------------------------------------------------------------------------------- fisher


def is_causal(model: Any) -> bool:
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def log_likelihood(model: Any, b: Any) -> Any:
    """The summed log-likelihood of the batch's own labels: next tokens (causal LM) or class
    labels (a sequence classifier). E963 for a model with neither."""
    import torch

    with forward_errors():
        out = model(**b.inputs)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise fail("E963", f"{type(model).__name__} gives no logits: the Fisher needs a causal LM "
                   "or a sequence classifier (config.json `architectures`)")
    if logits.dim() == 3 and is_causal(model):
        if b.labels is not None and b.labels.dim() == 2:
            targets = b.labels
        else:
            targets = b.inputs["input_ids"].masked_fill(~b.mask, -100)
        targets = targets[:, 1:]
        valid = targets != -100
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * valid).sum()
    if logits.dim() == 2:
        if b.labels is None:
            raise fail("E963", f"{type(model).__name__} is a classifier, but the data has no "
                       "labels", "give .jsonl data with a `label` field, or batches with `labels`")
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp.gather(-1, b.labels.long().view(-1, 1)).sum()
    raise fail("E963", f"{type(model).__name__}: the Fisher needs a causal LM (next tokens) or a "
               "sequence classifier (labels); this model's logits are neither")


def _fisher(lm: LoadedModel, d: Data, dev: Any, bs: int, seq_len: int, max_examples: int | None,
            counts: Counts, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    model = lm.model
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    with _bar(progress, _total(d, max_examples), "fisher") as bar:
        for b in batches(d, lm.tokenizer, dev, bs, seq_len, max_examples, counts):
            model.zero_grad(set_to_none=True)
            log_likelihood(model, b).backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += p.grad.detach() ** 2
            bar.update(b.size)
    model.zero_grad(set_to_none=True)
    by_id = {id(p): n for n, p in params.items()}
    out = {}
    for sd_name, tensor in model.state_dict(keep_vars=True).items():
        pn = by_id.get(id(tensor))
        if pn is not None and sd_name in lm.names:
            out[lm.names[sd_name]] = (acc[pn] / max(counts.examples, 1)).cpu()
    return out, {"normalization": "sum over batches of the squared gradient of the batch's "
                                  "summed log-likelihood, divided by the number of examples"}


# ---------------------------------------------------------------------------------------- write


