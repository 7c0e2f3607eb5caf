"""Peak memory with many input models, with and without `--memory-budget` (row chunking).

    python benchmarks/bench_budget.py --dir /tmp/mlbudget --size 0.3B --models 8 --memory-budget 1GB

Builds `--models` Llama-shaped bf16 checkpoints (a base and fine-tunes of it, as
bench_merge.py does), merges them with one recipe over all of them (`linear` by default) once
without a budget and once with it, each in a child process, and reports wall time, the peak RSS
of that process (`ru_maxrss`: Python, torch and everything else included) and the plan's
estimated peak of live tensors, unchunked and chunked. It checks that both outputs are
byte-identical.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import SIZES, _env, drop_output, make_model, timed_child  # noqa: E402

METHODS = {
    "linear": "linear([{all}])",
    "task_arithmetic": "task_arithmetic(m0, [{rest}], weights = 0.5)",
    "dare_linear": "dare_linear(m0, [{rest}], density = 0.5, seed = 1)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--size", default="0.3B", choices=[s for s in SIZES if s != "70B"])
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--method", default="linear", choices=sorted(METHODS))
    ap.add_argument("--memory-budget", default="1GB")
    args = ap.parse_args()
    root = args.dir / args.size
    names = [f"m{i}" for i in range(args.models)]
    for i, name in enumerate(names):
        if not (root / name / "config.json").is_file():
            print(f"making {name} ...", flush=True)
            make_model(root / name, args.size, seed=i, base=None if i == 0 else root / "m0")
    expr = METHODS[args.method].format(all=", ".join(names), rest=", ".join(names[1:]))
    recipe = root / f"{args.method}-{args.models}.mrg"
    recipe.write_text("".join(f'model {n} = "{root / n}"\n' for n in names)
                      + f'merge from m0 {{\n    "*" => {expr}\n}}\n')

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mergelang as ml
    from mergelang.passes.chunking import chunk_plan
    from mergelang.ir.types import parse_bytes

    budget = parse_bytes(args.memory_budget)
    r = ml.compile(recipe)
    plan = r.compilation.plan
    report = chunk_plan(plan, budget)
    r.close()
    in_bytes = sum(f.stat().st_size for n in names for f in (root / n).glob("*.safetensors"))
    print(f"{args.models} models of {args.size} ({in_bytes / 1e9:.2f} GB of inputs), {args.method}")
    print(f"plan peak of live tensors: {plan.peak_bytes / 2**20:.0f} MiB unchunked, "
          f"{report.plan.peak_bytes / 2**20:.0f} MiB chunked for {args.memory_budget} "
          f"({len(report.chunked)} tensors in {sum(report.chunked.values())} row chunks, "
          f"{len(report.unchunked)} that cannot be split)")
    outs = {}
    for label, extra in (("no budget", []), (f"--memory-budget {args.memory_budget}",
                                               ["--memory-budget", args.memory_budget])):
        out = root / f"out-{len(outs)}"
        drop_output(out)
        argv = [sys.executable, "-m", "mergelang", "run", str(recipe), "-o", str(out), "--force",
                "--quiet", "--device", "cpu", *extra]
        dt, rss, _ = timed_child(argv, _env())
        outs[label] = out
        print(f"  {label:28} wall {dt:7.2f} s   peak RSS {rss:7.0f} MiB")
    a, b = outs.values()
    files = sorted(p.name for p in a.glob("*.safetensors"))
    same = files == sorted(p.name for p in b.glob("*.safetensors")) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    print(f"outputs byte-identical: {same}")
    for out in outs.values():
        drop_output(out)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
