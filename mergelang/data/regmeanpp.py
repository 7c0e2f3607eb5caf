"""RegMean++ statistics (Nguyen et al. 2025; FusionBench `RegMeanAlgorithmPlusPlus`):
`ml.regmeanpp(models, data, alpha=...)` and `mergelang stats --kind gram-plusplus`.

RegMean (`stats --kind gram`) takes each linear layer's Gram matrix from the inputs the layer
receives in its OWN model. RegMean++ takes layer l's inputs from the model MERGED so far: the
data runs through the merged embeddings and the merged layers < l, then through candidate i's
own layer l, whose linear inputs give candidate i's Grams for that layer; layer l is then merged
(RegMean for the linear weights, the mean for its other tensors) before layer l + 1 is measured.
Conventions (FusionBench's, and mergelang's `regmean`):

* the tensors before the layers (embeddings) are merged by the mean, as FusionBench's
  `merge_embedding_layer`; a layer's linear weights by `regmean(models, grams, alpha)` (stdlib:
  G~ = alpha G + (1 - alpha) diag(G), W^T = (sum G~_i)^-1 sum G~_i W_i^T: FusionBench's
  `reduce_non_diagonal_ratio = alpha`), its other tensors (norms, biases) by the mean;
* the linear layers after the layers (lm_head, a classifier) get Grams too, from candidate i's
  own tail modules (final norm, head) on the merged model's last hidden states (FusionBench's
  CLIP driver keeps its zero-shot head instead; mergelang gives every linear layer a Gram, as
  `stats --kind gram` does);
* a Gram is the mean over the real tokens (padding never counts), as `stats --kind gram`;
  FusionBench averages over every position of its (unpadded) image batches;
* every model reads the same data (FusionBench: each model its own training set: pass a list,
  one data source per model).

The written Grams are per model, under each weight's name, so that
`regmean([a, b], [ga, gb], alpha = ALPHA)` (with the same alpha) computes the RegMean++ merge of
every layer. They depend on alpha and on the other models (the merge so far). Cost: the merged
layers < l are run again for each layer l and model (functional_call on one skeleton, no copy of
the activations kept): about L / 2 forward passes per model and batch for L layers, against 1
for `stats --kind gram`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from mergelang.data.inputs import (DEFAULT_SEQ_LEN, Counts, LoadedModel, batches, fail, forward_errors, load_data,
                                   load_model)


class _Stop(Exception):
    """Raised by a hook once the measured layer has run: the layers above it are not needed."""


def layer_list(model: Any) -> tuple[str, Any]:
    """(name, ModuleList) of the model's numbered blocks: the longest torch.nn.ModuleList."""
    import torch

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not found:
        raise fail("E963", f"{type(model).__name__} has no list of layers (torch.nn.ModuleList) to "
                   "merge layer by layer: RegMean++ needs a transformer's blocks")
    return max(found, key=lambda nm: len(nm[1]))


def _stages(lm: LoadedModel, first: Any) -> tuple[list[list[str]], list[str], list[str]]:
    """Parameter names (the model's own) of each layer, of the modules run before the layers
    (pre) and of the rest (tail), from one traced forward."""
    import torch

    prefix, layers = layer_list(lm.model)
    per_layer = [[f"{prefix}.{k}.{n}" for n, _ in layer.named_parameters()] for k, layer in enumerate(layers)]
    in_layers = {n for names in per_layer for n in names}
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
               for name, m in lm.model.named_modules() if not list(m.children())]
    try:
        with torch.no_grad(), forward_errors():
            lm.model(**first.inputs)
    finally:
        for h in handles:
            h.remove()
    start = next((k for k, n in enumerate(order) if n.startswith(prefix + ".")), len(order))
    before = set(order[:start])
    pre, tail = [], []
    for n, _ in lm.model.named_parameters():
        if n not in in_layers:
            (pre if n.rpartition(".")[0] in before else tail).append(n)
    return per_layer, pre, tail


def _linears_in(lm: LoadedModel, names: list[str]) -> list[tuple[str, Any]]:
    """(own weight name, module) of each nn.Linear whose weight is among `names` and is a
    checkpoint tensor."""
    import torch

    mods = dict(lm.model.named_modules())
    out = []
    for n in names:
        mod = mods.get(n.rpartition(".")[0])
        if n.endswith(".weight") and isinstance(mod, torch.nn.Linear) and n in lm.names:
            out.append((n, mod))
    return out


def merge_linear(ws: list[Any], gs: list[Any], alpha: float) -> Any:
    """stdlib `_regmean` for one weight: (sum G~_i)^-1 sum G~_i W_i^T, transposed."""
    import torch

    g = [alpha * x + (1 - alpha) * torch.diag(torch.diagonal(x)) for x in gs]
    return torch.linalg.solve(sum(g), sum(gi @ w.T for gi, w in zip(g, ws))).T


def _grams_at(lm: LoadedModel, params: dict[str, Any], cached: list[Any], targets: list[tuple[str, Any]],
              stop_at: Any) -> dict[str, Any]:
    """Mean-over-real-tokens Grams of the inputs of `targets` (name, Linear) when the skeleton
    runs with `params`; the forward stops after module `stop_at` (None: runs to the end)."""
    import torch
    from torch.func import functional_call

    acc: dict[str, Any] = {}
    rows = dict.fromkeys((n for n, _ in targets), 0)
    state: dict[str, Any] = {}

    def hook_for(n: str) -> Callable[..., None]:
        def hook(mod: Any, args: tuple, output: Any) -> None:
            x, mask = args[0].detach(), state["mask"]
            flat = (x[mask] if x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])).float()
            acc[n] = acc.get(n, 0) + flat.T @ flat
            rows[n] += flat.shape[0]
        return hook

    def stop(mod: Any, args: tuple, output: Any) -> None:
        raise _Stop

    handles = [m.register_forward_hook(hook_for(n)) for n, m in targets]
    if stop_at is not None:
        handles.append(stop_at.register_forward_hook(stop))
    try:
        with torch.no_grad(), forward_errors():
            for b in cached:
                state["mask"] = b.mask
                try:
                    functional_call(lm.model, params, args=(), kwargs=b.inputs, strict=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {n: acc[n] / rows[n] for n, _ in targets if rows[n]}


def plusplus_grams(lms: list[LoadedModel], cached: list[list[Any]], alpha: float,
                   progress: bool = False) -> list[dict[str, Any]]:
    """Per model {checkpoint weight name: Gram}, RegMean++ (module docstring). `lms` share one
    architecture; lms[0]'s model is the skeleton every forward runs in."""
    import sys

    import torch
    from tqdm import tqdm

    sk = lms[0]
    own = [{n: p.detach() for n, p in lm.model.named_parameters()} for lm in lms]
    per_layer, pre, tail = _stages(sk, cached[0][0])
    _, layers = layer_list(sk.model)
    merged = {n: torch.stack([o[n] for o in own]).mean(0) for n in pre}
    out: list[dict[str, Any]] = [{} for _ in lms]
    stages = [(names, layers[k]) for k, names in enumerate(per_layer)] + [(tail, None)]
    with tqdm(total=len(stages), unit="layer", desc="gram-plusplus", disable=not progress or None,
              file=sys.stderr) as bar:
        for names, module in stages:
            targets = _linears_in(sk, names)
            grams = []
            for i, o in enumerate(own):
                params = {**o, **merged} | {n: o[n] for n in names}
                g = _grams_at(sk, params, cached[i], targets, module)
                grams.append(g)
                out[i].update({sk.names[n]: v.cpu() for n, v in g.items()})
            for n in names:  # the merged layer, read by the next stage
                ws = [o[n] for o in own]
                if all(n in g for g in grams):
                    merged[n] = merge_linear(ws, [g[n] for g in grams], alpha)
                else:
                    merged[n] = torch.stack(ws).mean(0)
            bar.update(1)
    return out


def regmeanpp(models: list[str | Path], data: str | Path | list[str | Path], alpha: float = 0.95,
              out: list[str | Path] | None = None, *, max_examples: int | None = None,
              batch_size: int = 8, seq_len: int = DEFAULT_SEQ_LEN, device: str = "auto",
              field: str = "text", force: bool = False, progress: bool = False) -> list[Any]:
    """RegMean++ Grams of each model (module docstring): a list of `Stats` (kind "gram", as
    `ml.stats` returns), written to the sidecar folders `out` (one per model) when given."""
    from mergelang.data.sidecar import Stats, write_stats
    from mergelang.data.stats import protected
    from mergelang.runtime.executor import resolve_device

    if len(models) < 2:
        raise fail("E965", "RegMean++ merges two or more models", "give every model to merge")
    datas = list(data) if isinstance(data, (list, tuple)) else [data] * len(models)
    if isinstance(out, (str, Path)):  # one path is not a list of folders (a string's characters)
        raise fail("E965", f"out must be a list of {len(models)} folders, one per model, got {str(out)!r}")
    if len(datas) != len(models) or (out is not None and len(out) != len(models)):
        raise fail("E965", f"{len(models)} models need one data source (or one for all) and one "
                   "output folder each")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise fail("E965", f"alpha must be a number in [0, 1], got {alpha!r}")
    for name, v, lo in (("max_examples", max_examples, 1), ("batch_size", batch_size, 1),
                        ("seq_len", seq_len, 2)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
            raise fail("E965", f"{name} must be an integer >= {lo}, got {v!r}")
    try:
        dev = resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        raise fail("E402", str(exc)) from None
    guarded = [p for m, d in zip(models, datas) for p in protected(m, d)]
    if out is not None:
        _check_outs([Path(o) for o in out], guarded, force)
    t0 = time.perf_counter()
    lms = [load_model(m, dev) for m in models]
    shapes = [{n: tuple(p.shape) for n, p in lm.model.named_parameters()} for lm in lms]
    if any(s != shapes[0] for s in shapes[1:]):
        raise fail("E963", "RegMean++ needs models of one architecture and shape (their "
                   "parameters differ)")
    cached, counts = [], []
    for lm, d in zip(lms, datas):
        c = Counts()
        cached.append(list(batches(load_data(d, field), lm.tokenizer, dev, batch_size, seq_len,
                                   max_examples, c)))
        if c.tokens == 0:
            raise fail("E961", f"data {d} gave no tokens")
        counts.append(c)
    grams = plusplus_grams(lms, cached, float(alpha), progress)
    res = []
    for k, (m, d, g, c) in enumerate(zip(models, datas, grams, counts)):
        info = {"format": "mergelang-stats", "kind": "gram", "model": str(m), "data": str(d),
                "examples": c.examples, "tokens": c.tokens, "batch_size": batch_size,
                "seq_len": seq_len, "tensors": len(g), "seconds": round(time.perf_counter() - t0, 3),
                "plusplus": {"models": [str(x) for x in models], "index": k, "alpha": float(alpha)},
                "normalization": "mean over input rows (real tokens), inputs from the model merged "
                                 "so far (RegMean++)"}
        st = Stats("gram", {n: v.float() for n, v in g.items()}, info)
        if out is not None:
            st.path = write_stats(st, Path(out[k]), force, guarded)
        res.append(st)
    return res


def _check_outs(outs: list[Path], guarded: list[Path], force: bool) -> None:
    from mergelang.data.sidecar import check_out

    if len({o.resolve() for o in outs}) != len(outs):
        raise fail("E965", "give each model its own output folder")
    for o in outs:
        check_out(o, guarded + [x for x in outs if x != o], force)