"""The cost of the input digests the manifest records (io/digests.py): the same merge of three
synthetic ~100 MB float32 models, run alternately with the reader's CRC-32C on and off (patched
out), in one process; prints the median wall time of each and the ratio.

    python benchmarks/bench_input_digests.py [--mb 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def make_models(root: Path, mb: int) -> Path:
    import torch
    from safetensors.torch import save_file

    n = max(1, mb * (1 << 20) // (4 * 1024 * 1024))  # tensors of 1024 x 1024 float32 (4 MiB)
    for k, name in enumerate(("base", "a", "b")):
        g = torch.Generator().manual_seed(k)
        folder = root / name
        folder.mkdir()
        save_file({f"model.layers.{i}.w": torch.randn(1024, 1024, generator=g) for i in range(n)},
                  str(folder / "model.safetensors"))
    recipe = root / "r.mrg"
    recipe.write_text('model base = "base"\nmodel a = "a"\nmodel b = "b"\n'
                      'merge from base { "*" => task_arithmetic(base, [a, b], weights = [0.5, 0.5]) }\n')
    return recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import mergelang as ml
    from mergelang.io import checkpoint

    on_log, on_map = checkpoint.SafetensorsSource._log, checkpoint.SafetensorsSource._log_map
    times: dict[str, list[float]] = {"with digests": [], "without": []}
    spent = [0.0]  # seconds inside the reader's CRC-32C (summed over reader threads)

    def timed(self, *a, **k):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return on_log(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = make_models(root, args.mb)
        for rep in range(args.repeats + 1):  # the first round warms the page cache and the JIT
            for label in ("with digests", "without"):
                if label == "without":
                    checkpoint.SafetensorsSource._log = lambda *a, **k: None  # type: ignore[method-assign]
                    checkpoint.SafetensorsSource._log_map = lambda *a, **k: None  # type: ignore[method-assign]
                else:
                    checkpoint.SafetensorsSource._log, checkpoint.SafetensorsSource._log_map = timed, on_map
                r = ml.compile(recipe)
                t0 = time.perf_counter()
                r.run(root / f"out-{label.split()[0]}-{rep}", device="cpu")
                secs = time.perf_counter() - t0
                r.close()
                if rep:
                    times[label].append(secs)
    read_mb = 3 * args.mb
    w, wo = statistics.median(times["with digests"]), statistics.median(times["without"])
    print(f"inputs: 3 x {args.mb} MB float32; {args.repeats} runs each, alternating")
    for label, ts in times.items():
        print(f"{label:>13}: median {statistics.median(ts):.3f} s  (runs: {', '.join(f'{t:.2f}' for t in ts)})")
    print(f"ratio with/without: {w / wo:.3f}  ({(w - wo) * 1000:+.0f} ms for {read_mb} MB read)")
    print(f"time inside the CRC-32C, per run with digests: {spent[0] / (args.repeats + 1):.3f} s "
          f"(summed over reader threads)")


if __name__ == "__main__":
    main()
