"""Objectives on data for `tune` (`ml.objectives.perplexity`, `ml.objectives.lm_eval`): each
returns `f(state) -> float` that runs the merged tensors in memory (nothing written to disk) in a
model built once from `config` (a model folder: its config.json and tokenizer; its weights are
not used).

* `perplexity(data, config, max_examples=None)`: exp of the mean negative log-likelihood of
  every real next token of the data (the token-weighted mean over all examples: sum of NLL /
  number of predicted tokens), what `exp(loss)` of transformers' causal-LM loss gives on one
  unpadded example, and the count-weighted mean of those losses over several. Lower is better.
  The merged tensors drive the model through `torch.func.functional_call` (no copy).
* `lm_eval(tasks, config, include_path=None, limit=None, num_fewshot=None)`:
  lm-evaluation-harness (`pip install "mergelang[eval]"`) on the merged weights, loaded into the
  model (a copy per call) and wrapped in lm-eval's `HFLM`; returns the mean over the tasks of
  each task's primary metric (the first of its `metric_list`). A task written `TASK=METRIC*W`
  scores its metric METRIC (lm-eval's result key `METRIC,none`; `METRIC/FILTER` for
  `METRIC,FILTER`) times W: the score is sum(W_i * metric_i) / number of tasks (W = 1 and the
  primary metric by default, so plain task names give the mean), mergekit-evolve's weighted sum
  divided by the number of tasks. Local task YAMLs and data files through
  `include_path`; set HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 to stay offline. Higher is better.

`builtin(spec, reference, ...)` turns the CLI's `--objective perplexity:DATA` and
`--objective lm-eval:TASK[,TASK...]` into (objective, direction).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

from mergelang.data.inputs import DEFAULT_SEQ_LEN, LoadedModel, batches, fail, load_data, load_model

Objective = Callable[[Mapping[str, Any]], float]


class _Skeleton:
    """A model built from `config` (no weights read), moved to the device of the first state it
    runs, and the map from the state's checkpoint names to its own parameter names."""

    def __init__(self, config: str | Path):
        import torch

        self.lm: LoadedModel = load_model(config, torch.device("cpu"), want="causal", weights=False)
        self.device = torch.device("cpu")
        model = self.lm.model
        for p in model.parameters():
            p.requires_grad_(False)
        self.to_own = {ck: own for own, ck in self.lm.names.items()}
        # every parameter, with all its names (tied weights have several)
        by_id: dict[int, list[str]] = {}
        for n, t in model.state_dict(keep_vars=True).items():
            if isinstance(t, torch.nn.Parameter):
                by_id.setdefault(id(t), []).append(n)
        self.params = list(by_id.values())

    def state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """`state` under the model's own names, on one device, float32; E966 when it lacks a
        parameter (the objective would silently use the skeleton's random weights)."""
        import torch

        own = {self.to_own.get(k, k): v for k, v in state.items()}
        missing = [names[0] for names in self.params if not any(n in own for n in names)]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise fail("E966", f"the merged state has no tensor for the model's parameter "
                       f"{', '.join(missing[:3])}{more}",
                       f"the objective's model ({self.lm.folder}) must be the architecture the recipe merges")
        first = next(iter(own.values()), None)
        dev = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
        if dev != self.device:
            self.lm.model.to(dev)
            self.device = dev
        return {k: v.to(dev, torch.float32) for k, v in own.items()}


def perplexity(data: str | Path, config: str | Path, max_examples: int | None = None, *,
               batch_size: int = 8, seq_len: int = DEFAULT_SEQ_LEN, field: str = "text") -> Objective:
    """exp(sum of next-token NLL / number of predicted tokens) of the merged model on `data`
    (.txt, .jsonl, a datasets folder or FILE.py:BATCHES; see data/inputs.py)."""
    import torch

    from mergelang.data.stats import is_causal
    from mergelang.search.objectives import forward

    sk = _Skeleton(config)
    if not is_causal(sk.lm.model):
        raise fail("E963", f"perplexity needs a causal LM; {sk.lm.folder} builds "
                   f"{type(sk.lm.model).__name__}")
    d = load_data(data, field)
    cached = list(batches(d, sk.lm.tokenizer, torch.device("cpu"), batch_size, seq_len, max_examples))
    if not cached:
        raise fail("E961", f"data {data} gave no examples")

    def objective(state: Mapping[str, Any]) -> float:
        params = sk.state(state)
        nll, count = 0.0, 0
        with torch.no_grad():
            for b in cached:
                inputs = {k: v.to(sk.device) if isinstance(v, torch.Tensor) else v
                          for k, v in b.inputs.items()}
                logits = forward(sk.lm.model, params, **inputs).logits.float()
                mask = b.mask.to(sk.device)
                targets = inputs["input_ids"] if b.labels is None else b.labels.to(sk.device)
                targets = targets.masked_fill(~mask, -100)[:, 1:]
                valid = targets != -100
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                nll -= float((picked * valid).sum(dtype=torch.float64))
                count += int(valid.sum())
        if count == 0:
            raise fail("E961", f"data {data}: no example has two tokens, so no next token is predicted")
        return math.exp(nll / count)

    return objective


def _lm_eval_modules() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise fail("E964", "lm-eval objectives need lm-evaluation-harness, which is not installed",
                   'pip install "mergelang[eval]"') from None
    return lm_eval, HFLM, TaskManager


def task_entries(tasks: str | list[str]) -> list[tuple[str, str | None, float]]:
    """(task, metric key or None for the primary one, weight) per `TASK[=METRIC][*WEIGHT]`."""
    out = []
    for entry in (tasks.split(",") if isinstance(tasks, str) else tasks):
        entry = entry.strip()
        if not entry:
            continue
        head, star, w = entry.partition("*")
        name, eq, metric = head.partition("=")
        try:
            weight = float(w) if star else 1.0
        except ValueError:
            weight = math.nan
        m, slash, filt = metric.strip().partition("/")
        if not name.strip() or (eq and (not m.strip() or "=" in metric or (slash and not filt.strip()))) \
                or not math.isfinite(weight):
            raise fail("E966", f"lm-eval: cannot read the task {entry!r}",
                       "TASK, TASK=METRIC, TASK*WEIGHT or TASK=METRIC*WEIGHT (WEIGHT a number)")
        key = f"{m.strip()},{filt.strip() if slash else 'none'}" if eq else None
        out.append((name.strip(), key, weight))
    if out and all(w == 0 for _, _, w in out):
        raise fail("E966", "lm-eval: every task's weight is 0: the score would not depend on the merge",
                   "give at least one task a weight other than 0 (TASK*WEIGHT)")
    return out


def lm_eval(tasks: str | list[str], config: str | Path, include_path: str | Path | None = None,
            limit: int | float | None = None, *, batch_size: int = 8,
            num_fewshot: int | None = None) -> Objective:
    """The mean of the tasks' primary metrics (lm-evaluation-harness) for the merged weights;
    `TASK=METRIC*WEIGHT` entries as in the module's documentation."""
    entries = task_entries(tasks)  # a malformed spec is E966 before lm-eval's slow import
    lm_eval_mod, HFLM, TaskManager = _lm_eval_modules()
    names = list(dict.fromkeys(t for t, _, _ in entries))
    if not names:
        raise fail("E966", "lm-eval: no task named", "e.g. --objective lm-eval:hellaswag,arc_easy")
    if include_path is not None and not Path(include_path).exists():
        raise fail("E966", f"--lm-eval-include {include_path} does not exist")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        from mergelang.diagnostics import did_you_mean

        raise fail("E966", f"lm-eval: unknown task {unknown[0]!r}",
                   did_you_mean(unknown[0], manager.all_tasks) or
                   "give the folder of your task YAMLs with --lm-eval-include")
    sk = _Skeleton(config)
    held: dict[str, Any] = {}

    def objective(state: Mapping[str, Any]) -> float:
        import torch

        params = sk.state(state)
        model = sk.lm.model
        with torch.no_grad():
            for n, t in model.state_dict(keep_vars=True).items():
                if n in params:
                    t.data.copy_(params[n])
        if held.get("device") != sk.device:  # one wrapper per device: it holds the model
            held["lm"] = _quiet(lambda: HFLM(pretrained=model, tokenizer=sk.lm.tokenizer,
                                             batch_size=batch_size, device=str(sk.device)))
            held["device"] = sk.device
        more = {} if num_fewshot is None else {"num_fewshot": num_fewshot}
        out = _quiet(lambda: lm_eval_mod.simple_evaluate(
            model=held["lm"], tasks=names, task_manager=manager, limit=limit, log_samples=False,
            verbosity="ERROR", **more))
        return weighted_score(out, entries)

    return objective


def _quiet(fn: Callable[[], Any]) -> Any:
    """`fn()` with lm-eval's and datasets' progress bars and notices kept off the terminal."""
    import contextlib
    import io
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()):
        return fn()


def weighted_score(out: Mapping[str, Any], entries: list[tuple[str, str | None, float]]) -> float:
    """sum(weight * metric) / number of entries; a metric key None is the task's primary one."""
    total = 0.0
    for task, key, weight in entries:
        if key is None:
            value = primary_score(out, [task])
        else:
            res = out["results"][task]
            if key not in res:
                known = [k for k in res if k != "alias" and "stderr" not in k]
                raise fail("E966", f"lm-eval task {task} reported no metric {key!r}",
                           f"it reported {', '.join(known) or 'none'}")
            value = float(res[key])
        total += value if weight == 1.0 else weight * value
    return total / len(entries)


def primary_score(out: Mapping[str, Any], tasks: list[str]) -> float:
    """The mean over `tasks` of each one's first `metric_list` metric in lm-eval's results."""
    values = []
    for t in tasks:
        res = out["results"][t]
        metrics = [m["metric"] for m in out.get("configs", {}).get(t, {}).get("metric_list", [])]
        keys = [k for m in metrics[:1] for k in res if k.split(",")[0] == m]
        if not keys:  # a group or a task without a metric list: its first number
            keys = [k for k, v in res.items() if isinstance(v, (int, float)) and "stderr" not in k
                    and k != "alias"]
        if not keys:
            raise fail("E903", f"lm-eval task {t} reported no metric")
        values.append(float(res[keys[0]]))
    return sum(values) / len(values)


def builtin(spec: str, reference: str | Path, *, include_path: str | None = None,
            limit: int | None = None, num_fewshot: int | None = None) -> tuple[Objective, str] | None:
    """`perplexity:DATA` -> (perplexity objective, "minimize"), `lm-eval:TASKS` -> (lm_eval
    objective, "maximize"); None for any other spec (FILE.py:FUNC)."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in ("perplexity", "lm-eval"):
        return None
    if not arg:
        raise fail("E966", f"--objective {spec}: give the {'data' if kind == 'perplexity' else 'tasks'}"
                   f" after `{kind}:`", "e.g. --objective perplexity:val.txt or lm-eval:arc_easy")
    if kind == "perplexity":
        if include_path is not None or num_fewshot is not None:
            raise fail("E966", "--lm-eval-include and --num-fewshot are for --objective lm-eval:TASKS")
        return perplexity(arg, reference, max_examples=limit), "minimize"
    return lm_eval(arg, reference, include_path=include_path, limit=limit,
                   num_fewshot=num_fewshot), "maximize"
