"""The search and learned-merging demo on scikit-learn's digits (setting.py): for each seed,
builds a base and six fine-tunes, then compares on the held-out test split — each fine-tune
alone, task arithmetic (lambda = 0.3), TIES, TIES tuned by CMA-ES and task arithmetic tuned by
TPE on the validation split, task-wise and layer-wise AdaMerging and aTLAS-style coefficients
(learned on unlabeled validation inputs) — and prints the table: accuracy averaged over the
six tasks, mean and standard deviation over the seeds (as FusionBench's tables, plus seeds).

    python examples/digits/run.py             # 5 seeds (times: RESULTS.md, with the machine)
    python examples/digits/run.py --quick     # 1 seed, fewer trials and steps (the test)
    python examples/digits/run.py --record examples/digits/RESULTS.md   # what README.md quotes

The models are built per seed in a temporary folder. To run the recipes from the command line
instead, build seed 0's models next to them first: `python examples/digits/setting.py` (writes
examples/digits/models/, which the recipes and objectives.py read).
"""

from __future__ import annotations

import argparse
import datetime
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mergelang as ml  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import objectives  # noqa: E402  (the objective file tune and learn use from the CLI too)
from setting import TASKS, Evaluator, build  # noqa: E402

TA = "Task arithmetic (lambda = 0.3)"


def one_seed(root: Path, seed: int, trials: int, epochs: int) -> dict[str, tuple[list[float], float]]:
    """{method: (test accuracy per task, seconds)} for the models built with `seed`."""
    build(root, seed)
    ev = objectives.EVAL = Evaluator(root, seed)
    models = {n: str(root / n) for n in ("base", *TASKS)}
    out: dict[str, tuple[list[float], float]] = {}

    def row(name: str, state: dict, secs: float = 0.0) -> None:
        out[name] = ([ev.accuracy(state, t) for t in TASKS], secs)

    def weights(name: str) -> dict:
        return load_file(str(root / name / "model.safetensors"))

    row("Pretrained base (heads: linear probes)", weights("base"))
    out["Individual (each task's own fine-tune)"] = ([ev.accuracy(weights(t), t) for t in TASKS], 0.0)
    for t in TASKS:
        row(f"Fine-tune `{t}` alone", weights(t))

    def compiled(recipe: str) -> ml.Recipe:
        return ml.compile(HERE / recipe, **models)

    def timed(name: str, make) -> None:
        t0 = time.perf_counter()
        state = make()
        row(name, state, time.perf_counter() - t0)

    timed(TA, lambda: compiled("task_arithmetic.mrg").evaluate())
    timed("TIES (density 0.2, lambda 1.0)", lambda: compiled("ties.mrg").evaluate())

    def tuned(recipe: str, sampler: str):
        res = compiled(recipe).tune(objectives.val_accuracy, trials=trials, sampler=sampler, seed=seed)
        return compiled(recipe).with_params(**res.best_params).evaluate()
    timed(f"TIES tuned (CMA-ES, {trials} trials on validation)", lambda: tuned("ties.mrg", "cmaes"))
    timed(f"Task arithmetic, lambda tuned (TPE, {trials} trials)", lambda: tuned("task_arithmetic.mrg", "tpe"))
    for name, recipe in [("AdaMerging, task-wise", "adamerging_task.mrg"),
                         ("AdaMerging, layer-wise", "adamerging_layer.mrg"),
                         ("aTLAS-style, per tensor", "atlas.mrg")]:
        timed(name, lambda: compiled(recipe).learn(
            objectives.entropy_loss, objectives.batches(epochs, seed=seed), lr=1e-3).evaluate())
    timed("Layer-wise, learned on labeled validation (cross-entropy)", lambda: compiled(
        "adamerging_layer.mrg").learn(objectives.ce_loss, objectives.labeled_batches(epochs, seed=seed),
                                      lr=1e-2).evaluate())
    return out


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 10 trials, 3 epochs of batches")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the models are tiny; more threads only add "
                         "synchronisation, measured 10x slower with 2 on a loaded 2-core machine)")
    ap.add_argument("--record", type=Path, help="also write the table, the times and the machine "
                                                "to this markdown file (README.md quotes it)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    seeds = 1 if args.quick else args.seeds
    trials = 10 if args.quick else args.trials
    epochs = 3 if args.quick else 30
    runs = []
    load0, t0, cpu0 = _load(), time.perf_counter(), _cpu()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(seeds):
                runs.append(one_seed(Path(tmp) / f"seed{seed}", seed, trials, epochs))
                print(f"seed {seed}: " + ", ".join(f"{k.split(' (')[0]} {100 * sum(v[0]) / len(TASKS):.1f}"
                                                    for k, v in runs[-1].items() if "alone" not in k),
                      file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    text = table(runs)
    print(text)
    summary = (f"{seeds} seed{'s' if seeds != 1 else ''}, {trials} trials, {epochs} epochs of "
               f"batches: **{wall:.1f} s** wall, {cpu:.1f} s CPU (this process, all threads), "
               f"{args.threads} torch thread{'s' if args.threads != 1 else ''}; load average "
               f"{load0} -> {_load()}")
    print(summary, file=sys.stderr)
    if args.record:
        sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
        import machine

        args.record.write_text(
            f"# Recorded by `python examples/digits/run.py{' '.join([''] + (argv or sys.argv[1:]))}`\n\n"
            f"Machine: {machine.describe()}; {datetime.date.today().isoformat()}.\n\n"
            f"Run: {summary}. The time column is each method's wall time per seed (merge, trials "
            "or steps, mean over the seeds), on this machine under this load.\n\n" + text + "\n")
    return text


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _load() -> str:
    try:
        return "%.1f" % __import__("os").getloadavg()[0]
    except OSError:
        return "?"


def table(runs: list[dict[str, tuple[list[float], float]]]) -> str:
    lines = ["| Method | " + " | ".join(TASKS) + " | **Avg.** | vs TA | time (s) |",
             "|" + "---|" * (len(TASKS) + 4)]
    ta = [sum(r[TA][0]) / len(TASKS) for r in runs]
    for name in runs[0]:
        per_task = [statistics.mean(r[name][0][i] for r in runs) for i in range(len(TASKS))]
        avgs = [sum(r[name][0]) / len(TASKS) for r in runs]
        sd = f" ± {100 * statistics.stdev(avgs):.1f}" if len(runs) > 1 else ""
        diff = [a - b for a, b in zip(avgs, ta)]
        vs = "" if name == TA or name.startswith(("Pretrained", "Individual", "Fine-tune")) else \
            f"{100 * statistics.mean(diff):+.1f} ({sum(d > 0 for d in diff)}/{len(runs)} seeds better)"
        secs = statistics.mean(r[name][1] for r in runs)
        cells = " | ".join(f"{100 * a:.1f}" for a in per_task)
        lines.append(f"| {name} | {cells} | **{100 * statistics.mean(avgs):.1f}**{sd} | {vs} | "
                     f"{f'{secs:.1f}' if secs else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
