"""`mergelang inspect` against the read floor, side by side.

    python benchmarks/bench_inspect.py --dir /tmp/mlinspect                 # 0.27B-shaped, 3 models
    python benchmarks/bench_inspect.py --dir /tmp/mlinspect --size 0.05B    # a quick run
    python benchmarks/bench_inspect.py --dir /tmp/mlinspect --tiny 20000    # per-tensor overhead
    python benchmarks/bench_inspect.py --dir /tmp/mlinspect --tiny 90000 --repeat 1 \
        --baseline /tmp/old-inspect     # against an earlier checkout, side by side
    python benchmarks/bench_inspect.py --dir /tmp/mlinspect --tiny 90000 --baseline /tmp/old-inspect --cli

It writes a Llama-shaped bf16 base and two fine-tunes (base + small noise) into --dir (once;
reused when present), then times, in this process and with a warm page cache:
* the read floor: every tensor of every model read once and converted to float32
  (`ModelSource.load_as`, what any merge or statistic must do at least; with Python's garbage
  collector paused, as inspect pauses it);
* `ml.inspect(base, [ft1, ft2])` (json report, no folder), and with --spectrum also the SVDs;
* with --compare also inspect with every large tensor's statistics by the bucket method
  (tools/inspect_select.USE_BRACKET off: the method before the one-pass brackets).
Each is run --repeat times, alternating, after one warm-up of each (page cache, numba's cache);
the best time is kept. `--tiny N` builds three
checkpoints of N tiny tensors named like DeepSeek-V3's experts (model.layers.L.mlp.experts.E.*)
and reports the per-tensor overhead of inspect over the floor. Besides the wall-clock times, the
CPU time of the process (all threads) is printed: on a machine shared with other jobs, the CPU
ratio is the steadier measure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# hidden, intermediate, layers, heads, kv heads, vocab
SIZES = {"0.05B": (512, 1408, 8, 8, 2, 16000), "0.27B": (1024, 2816, 18, 16, 4, 32000),
         "1B": (2048, 5632, 22, 32, 4, 32000)}


def llama_shapes(size: str) -> dict[str, tuple[int, ...]]:
    h, inter, layers, heads, kv, vocab = SIZES[size]
    kvd = h // heads * kv
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                       p + "self_attn.k_proj.weight": (kvd, h), p + "self_attn.v_proj.weight": (kvd, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


def tiny_shapes(n: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    layer = 0
    while len(shapes) < n:
        for e in range(256):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if len(shapes) < n:
                    shapes[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = (4, 8)
        layer += 1
    return shapes


def build(folder: Path, shapes: dict[str, tuple[int, ...]]) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    paths = [folder / n for n in ("base", "ft1", "ft2")]
    if all((p / "model.safetensors").is_file() for p in paths):
        return paths
    g = torch.Generator().manual_seed(0)
    for k, p in enumerate(paths):
        p.mkdir(parents=True, exist_ok=True)
        sd = {}
        for name, shape in shapes.items():
            gen = torch.Generator().manual_seed(hash(name) % (1 << 31))
            t = torch.randn(shape, generator=gen)
            if k:
                t += 0.01 * torch.randn(shape, generator=g)
            sd[name] = t.to(torch.bfloat16)
        save_file(sd, str(p / "model.safetensors"))
        del sd
    return paths


def read_floor(paths: list[Path]) -> tuple[float, float]:
    import torch

    from mergelang.io.locate import open_model

    from mergelang.tools.inspect import gc_paused

    t0, c0 = time.perf_counter(), time.process_time()
    with gc_paused():  # as inspect runs (the collector's passes over 90k header entries: seconds)
        srcs = [open_model(p.name, p) for p in paths]
        for name in srcs[0].tensors():
            for s in srcs:
                t = s.load_as(name, torch.float32)
                del t
        for s in srcs:
            s.close()
    return time.perf_counter() - t0, time.process_time() - c0


def run_inspect(paths: list[Path], spectrum: bool = False) -> tuple[float, float]:
    import mergelang as ml

    t0, c0 = time.perf_counter(), time.process_time()
    ml.inspect(paths[0], paths[1:], device="cpu", spectrum=spectrum)
    return time.perf_counter() - t0, time.process_time() - c0


#: run in a fresh process by --baseline: time ml.inspect of the tree on sys.path[0]
CHILD = """
import gc, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
if sys.argv[6] == "gc-off":
    gc.disable()
import mergelang as ml
assert ml.__file__.startswith(sys.argv[1]), ml.__file__
paths = sys.argv[2:5]
runs = []
for _ in range(int(sys.argv[5]) + 1):  # the first: warm-up (numba's cache, page cache)
    t0, c0 = time.perf_counter(), time.process_time()
    ml.inspect(paths[0], paths[1:], device="cpu")
    runs.append((time.perf_counter() - t0, time.process_time() - c0))
print(json.dumps({"best": min(runs[1:]), "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child_inspect(repo: Path, paths: list[Path], repeat: int, gc_off: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(repo), *map(str, paths), str(repeat),
                          "gc-off" if gc_off else "gc-on"],
                         check=True, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return json.loads(out.stdout.strip().splitlines()[-1])


#: run in a fresh process by --cli: `mergelang inspect ... -o OUT --format html` of one tree
CLI_CHILD = """
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import mergelang
assert mergelang.__file__.startswith(sys.argv[1]), mergelang.__file__
from mergelang.cli import main
t0, c0 = time.perf_counter(), time.process_time()
main([*sys.argv[2:], "--format", "html", "--force", "-q"], standalone_mode=False)
out = sys.argv[-1]
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "json_mb": os.path.getsize(os.path.join(out, "report.json")) / 1e6,
                  "html_kb": os.path.getsize(os.path.join(out, "report.html")) / 1e3}))
"""


def cli_side_by_side(baseline: Path, paths: list[Path], out: Path) -> None:
    """The command line, html report included, of each tree (once each, a fresh process)."""
    import shutil

    print("mergelang inspect BASE FT1 FT2 -o DIR --format html (fresh process each, one run):")
    for label, repo in (("baseline", baseline.resolve()), ("this tree", REPO)):
        dest = out / f"cli-{label.replace(' ', '-')}"
        shutil.rmtree(dest, ignore_errors=True)
        cmd = [sys.executable, "-c", CLI_CHILD, str(repo), "inspect", *map(str, paths), "-o", str(dest)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                      env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                                      ).stdout.strip().splitlines()[-1])
        print(f"  {label:16s} {r['wall']:7.2f} s (CPU {r['cpu']:.2f} s), peak RSS {r['maxrss_mb']:.0f} MB, "
              f"report.json {r['json_mb']:.1f} MB, report.html {r['html_kb']:.0f} kB")


def side_by_side(baseline: Path, paths: list[Path], n: int, floor: float, repeat: int) -> None:
    """This tree's inspect against `baseline`'s, each in its own process, alternating; and the
    baseline with Python's garbage collector off for the whole process (what pausing it alone
    gives)."""
    res: dict[str, list[dict]] = {"baseline": [], "baseline, GC off": [], "this tree": []}
    for _ in range(repeat):
        res["baseline"].append(child_inspect(baseline.resolve(), paths, 1))
        res["baseline, GC off"].append(child_inspect(baseline.resolve(), paths, 1, gc_off=True))
        res["this tree"].append(child_inspect(REPO, paths, 1))
    print(f"side by side (fresh process each; read floor {floor:.2f} s):")
    for label, rs in res.items():
        (w, c), rss = min(r["best"] for r in rs), max(r["maxrss_mb"] for r in rs)
        line = f"  {label:16s} inspect {w:7.2f} s (CPU {c:.2f} s), peak RSS {rss:.0f} MB"
        if n:
            line += f", {1e6 * (w - floor) / n:.0f} us per tensor over the read floor"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.27B")
    ap.add_argument("--tiny", type=int, default=0, metavar="N", help="N tiny tensors instead")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--spectrum", action="store_true", help="also time inspect --spectrum (once)")
    ap.add_argument("--compare", action="store_true",
                    help="also time inspect with the bucket method for every large tensor (the "
                         "selection before the one-pass brackets), alternating with the others")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="also time the inspect of this checkout (an earlier commit) side by side")
    ap.add_argument("--cli", action="store_true",
                    help="with --baseline: only time the command line with an html report, each tree once")
    args = ap.parse_args()
    shapes = tiny_shapes(args.tiny) if args.tiny else llama_shapes(args.size)
    label = f"tiny{args.tiny}" if args.tiny else args.size
    params = sum(_numel(s) for s in shapes.values())
    t0 = time.perf_counter()
    paths = build(args.dir / label, shapes)
    print(f"{label}: {len(shapes)} tensors, {params / 1e9:.3f}B params per model, 3 models "
          f"(bf16; built/reused in {time.perf_counter() - t0:.1f}s)")
    if args.cli and args.baseline is not None:
        cli_side_by_side(args.baseline, paths, args.dir)
        return
    read_floor(paths)  # warm the page cache
    run_inspect(paths)  # and load the compiled loops (numba's cache) once
    from mergelang.tools import inspect_select

    floor, insp, old = [], [], []
    for _ in range(args.repeat):
        floor.append(read_floor(paths))
        insp.append(run_inspect(paths))
        if args.compare:
            inspect_select.USE_BRACKET = False
            old.append(run_inspect(paths))
            inspect_select.USE_BRACKET = True
    (f, fc), (i, ic) = min(floor), min(insp)
    print(f"read floor   {f:8.2f} s   (CPU {fc:.2f} s, all threads)")
    if old:
        o, oc = min(old)
        print(f"inspect (buckets) {o:8.2f} s   (CPU {oc:.2f} s)   ratio {o / f:.2f}x   CPU ratio {oc / fc:.2f}x")
    print(f"inspect      {i:8.2f} s   (CPU {ic:.2f} s)   ratio {i / f:.2f}x   CPU ratio {ic / fc:.2f}x")
    if args.tiny:
        print(f"per tensor   floor {1e6 * f / len(shapes):.0f} us, inspect {1e6 * i / len(shapes):.0f} us, "
              f"overhead {1e6 * (i - f) / len(shapes):.0f} us per tensor (3 models)")
    if args.baseline is not None:
        side_by_side(args.baseline, paths, args.tiny, f, args.repeat)
    if args.spectrum:
        s = run_inspect(paths, spectrum=True)[0]
        print(f"--spectrum   {s:8.2f} s   ratio {s / f:.2f}x (SVDs: {s - i:.1f} s)")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
