"""Benchmark mergelang against the I/O floor (and mergekit, when `mergekit-yaml` is given or on PATH).

    python benchmarks/bench_merge.py --dir /tmp/mlbench --size 1B          # base + 2 fine-tunes, bf16
    python benchmarks/bench_merge.py --dir /tmp/mlbench --size 0.1B        # a quick run
    python benchmarks/bench_merge.py --dir /tmp/mlbench --compile-only     # 70B-shaped `check`, headers only

For each recipe (linear over the three models, ties of the two fine-tunes on the base) it reports
mergelang's wall time and peak RSS (a child process; `ru_maxrss` of that child), the I/O floor
(reading every input tensor once with safetensors and writing one output of the same size, also
in a child), mergekit's time and peak RSS when `mergekit-yaml` is given with `--mergekit` or on
PATH (never a dependency: install it in its own venv), and ratios.

The compile benchmark builds 70B-shaped (Llama-2-70B: 80 layers) checkpoints whose headers are
correct but whose data is sparse (the files are `ftruncate`d to their full size), and times
`mergelang check` on them: only headers are read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Llama-shaped configs: hidden, intermediate, layers, heads, kv heads, vocab
SIZES = {
    "0.1B": (768, 2048, 12, 12, 4, 32000),
    "0.3B": (1024, 2816, 20, 16, 4, 32000),
    "1B": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B
    "70B": (8192, 28672, 80, 64, 8, 32000),  # Llama-2-70B
}
SHARD_BYTES = 2 * 1024**3


def llama_shapes(size: str) -> dict[str, tuple[int, ...]]:
    h, inter, layers, heads, kv, vocab = SIZES[size]
    kvd = h // heads * kv
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kvd, h),
            p + "self_attn.v_proj.weight": (kvd, h), p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


def llama_config(size: str) -> dict:
    h, inter, layers, heads, kv, vocab = SIZES[size]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shard_groups(shapes: dict[str, tuple[int, ...]], itemsize: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nb = _numel(shape) * itemsize
        if groups[-1] and size + nb > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nb
    return groups


def _write_index(folder: Path, groups: list[list[str]], shapes, itemsize: int) -> list[str]:
    n = len(groups)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(_numel(s) for s in shapes.values()) * itemsize
    weight_map = {name: files[i] for i, g in enumerate(groups) for name in g}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return files


def make_model(folder: Path, size: str, seed: int, base: Path | None = None) -> None:
    """A bf16 Llama-shaped checkpoint; with `base`, a "fine-tune": base + small noise."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(size)
    groups = _shard_groups(shapes, 2)
    files = _write_index(folder, groups, shapes, 2)
    gen = torch.Generator().manual_seed(seed)
    for fname, group in zip(files, groups):
        base_sd = load_file(base / fname) if base is not None else None
        sd = {}
        for name in group:
            shape = shapes[name]
            if base_sd is not None:
                t = base_sd[name].float()
                t += torch.randn(shape, generator=gen) * 0.002
            elif name.endswith("norm.weight"):
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=gen) * 0.02
            sd[name] = t.to(torch.bfloat16)
            del t
        save_file(sd, folder / fname, metadata={"format": "pt"})
        del sd, base_sd
    (folder / "config.json").write_text(json.dumps(llama_config(size), indent=1))  # last: "done"


def make_header_only_model(folder: Path, size: str) -> None:
    """Correct safetensors headers, sparse data (ftruncate): for compile-time benchmarks."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(size)
    groups = _shard_groups(shapes, 2)
    files = _write_index(folder, groups, shapes, 2)
    (folder / "config.json").write_text(json.dumps(llama_config(size), indent=1))
    for fname, group in zip(files, groups):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name in group:
            nb = _numel(shapes[name]) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + off)


RECIPES = {
    "linear": 'merge from base {\n    "*" => linear([base, a, b])\n}\n',
    "ties": 'merge from base {\n    "*" => ties(base, [a, b], weights = [1, 1], density = 0.5)\n}\n',
}
MERGEKIT = {
    "linear": """\
        merge_method: linear
        dtype: bfloat16
        models:
          - model: {root}/base
            parameters: {{weight: 1.0}}
          - model: {root}/a
            parameters: {{weight: 1.0}}
          - model: {root}/b
            parameters: {{weight: 1.0}}
        """,
    "ties": """\
        merge_method: ties
        base_model: {root}/base
        dtype: bfloat16
        parameters: {{normalize: true}}
        models:
          - model: {root}/a
            parameters: {{weight: 1.0, density: 0.5}}
          - model: {root}/b
            parameters: {{weight: 1.0, density: 0.5}}
        """,
}


def write_recipe(root: Path, method: str) -> Path:
    header = "".join(f'model {m} = "{root / m}"\n' for m in ("base", "a", "b"))
    path = root / f"{method}.mrg"
    path.write_text(header + RECIPES[method])
    return path


def timed_child(argv: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run argv in a wrapper process; (wall seconds, peak RSS in MiB of argv, stdout)."""
    wrapper = ("import resource, subprocess, sys, time\n"
               "t = time.perf_counter()\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "dt = time.perf_counter() - t\n"
               "sys.stderr.write(p.stderr)\n"
               "print(p.returncode, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "print(p.stdout)\n")
    p = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, env=env)
    first, _, rest = p.stdout.partition("\n")
    if len(first.split()) != 3:  # the wrapper itself failed (e.g. argv[0] cannot be run)
        raise RuntimeError(f"{' '.join(argv)} could not be run:\n{p.stderr[-3000:]}")
    rc, dt, rss = first.split()
    if int(rc) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {rc}):\n{p.stderr[-3000:]}")
    return float(dt), int(rss) / 1024, rest


IO_FLOOR = """\
import json, sys, time
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
durable = sys.argv[1] == "--fsync"
args = sys.argv[2:] if durable else sys.argv[1:]
roots, out = [Path(p) for p in args[:-1]], Path(args[-1])
out.mkdir(parents=True, exist_ok=True)
t = time.perf_counter()
kept = {}
for i, root in enumerate(roots):
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                x = h.get_tensor(name).clone()   # get_tensor is a lazy mmap view: copy = read
                if i == 0:
                    kept.setdefault(f.name, {})[name] = x   # one output of the same size
                del x
for fname, sd in kept.items():
    save_file(sd, out / fname)
    if durable:  # on disk, as mergelang's output is before it is renamed into place
        import os
        fd = os.open(out / fname, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
print(time.perf_counter() - t)
"""


def _env() -> dict:
    env = dict(os.environ)
    # steady state, as after any install: modules' bytecode cached (some sandboxes set this, and
    # an editable checkout would then recompile mergelang's ~50 modules in every run, ~0.15 s)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def drop_output(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def bench_merge(root: Path, methods: list[str], budget: str | None, device: str, repeat: int,
                mergekit: str | None) -> None:
    models = [root / m for m in ("base", "a", "b")]
    in_bytes = sum(f.stat().st_size for m in models for f in m.glob("*.safetensors"))
    print(f"inputs: 3 models, {in_bytes / 1e9:.2f} GB; cores: {os.cpu_count()}; device: {device}")
    # warm the page cache the same way for everyone: one floor run first (not counted)
    floor_out = root / "floor-out"
    timed_child([sys.executable, "-c", IO_FLOOR, *map(str, models), str(floor_out)])
    drop_output(floor_out)
    def floor_run(*flags: str) -> tuple[float, float]:
        """(process wall time, time inside the process after its imports) of one floor run."""
        dt, _, out = timed_child([sys.executable, "-c", IO_FLOOR, *flags, *map(str, models), str(floor_out)])
        drop_output(floor_out)
        return dt, float(out.strip())

    floor_runs = [floor_run() for _ in range(repeat)]
    durable_runs = [floor_run("--fsync") for _ in range(repeat)]
    floor, durable = min(r[0] for r in floor_runs), min(r[0] for r in durable_runs)
    # every time below is a whole process, timed the same way: python start-up, imports, work
    print(f"I/O floor (a python process that reads 3 models and writes 1 with safetensors): {floor:.2f} s"
          f" (of which reading + writing: {min(r[1] for r in floor_runs):.2f} s)")
    print(f"durable I/O floor (the same, output fsynced as mergelang does by default): {durable:.2f} s"
          f" (of which reading + writing + fsync: {min(r[1] for r in durable_runs):.2f} s)")
    startup = min(timed_child([sys.executable, "-c", "import mergelang, torch, numba"], _env())[0]
                  for _ in range(repeat))
    print(f"process start-up in every mergelang run (python, import torch and numba): {startup:.2f} s")
    has_mk = mergekit is not None
    rows = []
    for method in methods:
        recipe = write_recipe(root, method)
        out = root / f"out-{method}"
        argv = [sys.executable, "-m", "mergelang", "run", str(recipe), "-o", str(out), "--force",
                "--quiet", "--device", device]
        if budget:
            argv += ["--memory-budget", budget]
        timed = {}
        for mode, extra in (("durable", []), ("no-fsync", ["--no-fsync"])):
            runs = []
            for _ in range(repeat):
                drop_output(out)
                runs.append(timed_child(argv + extra, _env())[:2])
            drop_output(out)
            timed[mode] = (min(r[0] for r in runs), max(r[1] for r in runs))
        mk = None
        if has_mk:
            cfg = root / f"mergekit-{method}.yml"
            cfg.write_text(textwrap.dedent(MERGEKIT[method]).format(root=root))
            mk_out = root / f"mk-{method}"
            drop_output(mk_out)
            # the synthetic models have no tokenizer to copy
            mk_argv = [mergekit, str(cfg), str(mk_out), "--no-copy-tokenizer"]
            mk_argv += ["--cuda"] if device == "cuda" else []
            mk = timed_child(mk_argv)[:2]
            drop_output(mk_out)
        rows.append((method, timed, mk))
    print("\nmergelang (default: output fsynced) against the durable floor; mergelang --no-fsync against "
          "the floor;\nmergekit (never fsyncs) against the default mergelang run (the conservative ratio)")
    print(f"{'method':8} {'mergelang s':>12} {'x durable':>10} {'no-fsync s':>11} {'x floor':>8} "
          f"{'peak RSS MiB':>13} {'mergekit s':>11} {'mk RSS MiB':>11} {'x mergekit':>11}")
    for method, timed, mk in rows:
        dt, rss = timed["durable"]
        nf = timed["no-fsync"][0]
        rss = max(rss, timed["no-fsync"][1])
        mk_s = f"{mk[0]:11.2f} {mk[1]:11.0f}" if mk is not None else f"{'n/a':>11} {'n/a':>11}"
        ratio = f"{dt / mk[0]:11.2f}" if mk is not None else f"{'n/a':>11}"
        print(f"{method:8} {dt:12.2f} {dt / durable:10.2f} {nf:11.2f} {nf / floor:8.2f} {rss:13.0f} {mk_s} {ratio}")
    if not has_mk:
        print("(no mergekit-yaml on PATH and no --mergekit: no mergekit comparison)")


def bench_compile(root: Path, repeat: int) -> None:
    big = root / "70B"
    for m in ("base", "a", "b"):
        if not (big / m / "config.json").is_file():
            make_header_only_model(big / m, "70B")
    n = len(llama_shapes("70B"))
    print(f"70B-shaped (80 layers, {n} tensors per model, header-only sparse files)")
    for method in RECIPES:
        recipe = write_recipe(big, method)
        times = [timed_child([sys.executable, "-m", "mergelang", "check", str(recipe)], _env())[0]
                 for _ in range(repeat)]
        print(f"  mergelang check {method}.mrg: {min(times):.2f} s (process wall time, best of {repeat})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, type=Path, help="where the synthetic checkpoints go")
    ap.add_argument("--size", default="1B", choices=[s for s in SIZES if s != "70B"])
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), metavar="EXE",
                    help="mergekit-yaml to compare with (default: the one on PATH); install it in its "
                         "own venv, e.g. python -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit==0.1.5")
    ap.add_argument("--compile-only", action="store_true", help="only the 70B-shaped compile benchmark")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile benchmark")
    args = ap.parse_args()
    if args.mergekit is not None and shutil.which(args.mergekit) is None:
        ap.error(f"--mergekit {args.mergekit}: not an executable (give the path of mergekit-yaml)")
    args.dir.mkdir(parents=True, exist_ok=True)
    root = args.dir.resolve()
    if not args.compile_only:
        root_size = root / args.size
        if not (root_size / "b" / "config.json").is_file():
            t = time.perf_counter()
            make_model(root_size / "base", args.size, 0)
            make_model(root_size / "a", args.size, 1, base=root_size / "base")
            make_model(root_size / "b", args.size, 2, base=root_size / "base")
            print(f"made 3 {args.size} checkpoints in {time.perf_counter() - t:.0f} s")
        bench_merge(root_size, args.methods.split(","), args.memory_budget, args.device, args.repeat,
                    args.mergekit)
    if not args.no_compile:
        bench_compile(root, args.repeat)



if __name__ == "__main__":
    main()
