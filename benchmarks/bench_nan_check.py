"""The cost of --nan-check on the inputs (issue 34): the same merge with and without the input
checks (the output checks run in both), in child processes, alternating, best of `--repeat`.

    python benchmarks/bench_nan_check.py --dir /tmp/mlbench-nan --size 0.3B --repeat 3

The models are bench_merge.py's synthetic bf16 Llama-shaped base and two fine-tunes. "without"
replaces `checked_inputs` by the identity (the code before the input checks); "with" is a plain
run (nan_check "error", the default), which also reports the time spent inside the checks (a
steadier number than the ratio on a busy machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import SIZES, _env, drop_output, make_model, timed_child, write_recipe  # noqa: E402

DRIVER = """\
import sys, time
import mergelang as ml
import mergelang.api
from mergelang.io.inputcheck import InputCheck
spent = [0.0]
if sys.argv[1] == "without":
    mergelang.api.checked_inputs = lambda models, check: models
else:  # time the checks themselves (summed over the reader threads)
    call = InputCheck.__call__
    def timed(self, *a):
        t = time.perf_counter()
        call(self, *a)
        spent[0] += time.perf_counter() - t
    InputCheck.__call__ = timed
r = ml.compile(sys.argv[2])
t = time.perf_counter()
r.run(sys.argv[3], device="cpu", force=True)
print(time.perf_counter() - t, spent[0])
"""


ISOLATED = """\
import sys, time, torch
from mergelang.io.locate import open_model
from mergelang.io.checked import all_finite
torch.set_num_threads(1)
read = check = 0.0
for folder in sys.argv[1:]:
    src = open_model("m", folder)
    for name in src.tensors():
        t0 = time.perf_counter()
        t = src.load_as(name, torch.float32)
        t1 = time.perf_counter()
        assert all_finite(t)
        check += time.perf_counter() - t1
        read += t1 - t0
print(read, check)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--size", default="0.3B", choices=[s for s in SIZES if s != "70B"])
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = args.dir / args.size
    if not (root / "b" / "config.json").exists():
        make_model(root / "base", args.size, 0)
        make_model(root / "a", args.size, 1, base=root / "base")
        make_model(root / "b", args.size, 2, base=root / "base")
    env = _env()
    reads, checks = [], []
    for _ in range(args.repeat):
        _, _, text = timed_child([sys.executable, "-c", ISOLATED, *(str(root / m) for m in ("base", "a", "b"))], env)
        r, c = (float(x) for x in text.split())
        reads.append(r)
        checks.append(c)
    print(f"isolated, one thread: reading the 3 models as float32 {min(reads):.2f} s, checking them "
          f"{min(checks):.2f} s ({min(checks) / min(reads):.1%} of the read)")
    for method in args.methods.split(","):
        recipe = write_recipe(root, method)
        best = {"with": float("inf"), "without": float("inf")}
        share = []
        for _ in range(args.repeat):
            for mode in ("without", "with"):
                out = root / f"out-{method}"
                drop_output(out)
                _, _, text = timed_child([sys.executable, "-c", DRIVER, mode, str(recipe), str(out)], env)
                run_s, check_s = (float(x) for x in text.split())
                best[mode] = min(best[mode], run_s)
                if mode == "with":
                    share.append(check_s / run_s)
                drop_output(out)
        print(f"{method} {args.size}: run without input checks {best['without']:.2f} s, with "
              f"{best['with']:.2f} s (best of {args.repeat}), ratio {best['with'] / best['without']:.3f}; "
              f"time inside the checks {min(share):.1%}-{max(share):.1%} of the run")


if __name__ == "__main__":
    main()
