"""Generated CPU kernels for FUSED steps (see `fuse.py`): one numba loop per fused program.

A program (the FUSED node's attrs) lists its instructions in order; the generated function runs
them per element `i` of the tensor shape, every value a float32 or bool scalar in registers (a
value over models: one scalar per model), reads each input element once and writes the root.

Exactness: each instruction is the IEEE operation torch's kernel performs, so results are the
plain kernels' bits (tests/passes/test_fused.py compares them bit for bit, special values included):
add/sub/mul/div are correctly rounded in both (numba compiles without fast-math, so nothing
is contracted into an FMA or reassociated); `neg`, `abs`, comparisons, `where` and the logical
ops are exact; `sign` is torch's (x > 0) - (x < 0) (NaN and -0.0 give +0.0); a sum over models
adds from +0.0 in model order, which is torch's order for up to 4 models (`fuse.MAX_SUM_MODELS`);
`count` adds exact small integers. `minimum`/`maximum` fuse only against a nonzero constant, so
the one case where torch's vectorised and scalar paths differ (+0 against -0) cannot occur. The
one documented difference: a NaN produced by arithmetic may carry another payload or sign than
torch's (NaN stays NaN). `sqrt` does not fuse: torch's CPU float32 sqrt is not always the
correctly rounded one (found by the tests: one ulp off for some inputs). bfloat16 inputs are
widened exactly (the 16 bits shifted up).

Kernels are compiled on first use (about a second each) and cached: in memory per process and on
disk (`MERGELANG_CACHE_DIR`, default `~/.cache/mergelang`) through numba's own cache, keyed by
the generated source, which depends only on the program, the input dtypes and (its first line)
a digest of numba_runtime.py and numba's version: the helpers a kernel inlines, so a kernel
compiled before an upgrade that changed one is compiled again, not reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelang.runtime.workers import parallel_map

#: elements per call above which the loop is split over threads
PARALLEL_ELEMENTS = 1 << 20
#: threads per call (default: torch's thread count)
THREADS = int(os.environ.get("MERGELANG_FUSED_THREADS", "0")) or None

_LOCK = threading.Lock()
_MODULES: dict[str, Any] = {}


def threads_for(elements: int) -> int:
    """Threads a kernel call over this many elements is split over."""
    return (THREADS or torch.get_num_threads()) if elements >= PARALLEL_ELEMENTS else 1


def available() -> bool:
    """Whether numba and the runtime helpers load (fusion is skipped otherwise)."""
    try:  # the runtime helpers too: numba refuses to decorate when no cache dir is writable
        from mergelang.runtime.kernels import numba_runtime as kernels_fused_rt  # noqa: F401
    except Exception:  # pragma: no cover - numba is a dependency; broken installs fall back
        return False
    return True


def program_lines(body: tuple, kinds: tuple[str, ...], dtypes: tuple[str, ...], models: int,
             segmented: bool = False) -> tuple[list[str], list[str], list[str], list[str]]:
    """A program as straight-line code for element `i`: (parameters, prelude lines run once,
    body lines per element, the root's value name per model, or one name). `segmented`: the
    block scales of FP8 inputs are the names `fq{j}` the caller sets per run of elements sharing
    a block (`_segments`), not looked up per element."""
    params, loads, prelude = [], [], offsets(models)
    names: list[list[str]] = []  # per input: one name, or one per model
    for j, (kind, dt) in enumerate(zip(kinds, dtypes)):
        if kind.startswith("fp8:"):  # codes + geometry (columns, block columns); scales: input j+1
            params += [f"a{j}", f"fgeo{j}"]
            prelude += [f"fc{j} = fgeo{j}[0]", f"fg{j} = fgeo{j}[1]"]
            scale = f"fq{j}" if segmented else f"a{j + 1}[{_block_index(kind, j, 'i')}]"
            loads.append(f"x{j} = {_FP8_TABLES[dt]}[a{j}[i]] * {scale}")
            names.append([f"x{j}"])
        elif kind == "fp8scale":  # read through its codes' input, never a value itself
            params.append(f"a{j}")
            names.append([])
        elif kind in ("elem", "stack"):
            params.append(f"a{j}")
            parts = range(models) if kind == "stack" else [None]
            cur = []
            for m in parts:
                nm = f"x{j}" if m is None else f"x{j}_{m}"
                loads.append(f"{nm} = {_widen(dt, f'a{j}[{flat_index(m)}]')}")
                cur.append(nm)
            names.append(cur)
        else:  # scalar(s): a 1-D array of one value, or one per model
            params.append(f"a{j}")
            count = models if kind == "mscalar" else 1
            cur = [f"s{j}_{m}" for m in range(count)]
            prelude += [f"{nm} = {_widen(dt, f'a{j}[{m}]')}" for m, nm in enumerate(cur)]
            names.append(cur)
    values: list[list[str]] = []
    ops = []

    def arg(ref, m):
        kind, k = ref
        vs = names[k] if kind == "in" else values[k]
        return vs[m] if len(vs) > 1 else vs[0]

    for k, (code, refs, stacked, _dtype) in enumerate(body):
        if code == "stack":
            values.append([arg(r, 0) for r in refs])
            continue
        if code in ("sum", "count"):
            terms = values[refs[0][1]] if refs[0][0] == "v" else names[refs[0][1]]
            expr = "Z"
            for t in terms:
                add = t if code == "sum" else (f"sel({t}, ONE, Z)" if _is_bool(body, dtypes, kinds, refs[0])
                                               else f"sel({t} != Z, ONE, Z)")
                expr = f"({expr} + {add})"
            values.append([f"v{k}"])
            ops.append(f"v{k} = {expr}")
            continue
        outs = [f"v{k}_{m}" for m in range(models)] if stacked else [f"v{k}"]
        for m, o in enumerate(outs):
            a = [arg(r, m) for r in refs]
            ops.append(f"{o} = {_expr(code, a)}")
        values.append(outs)
    return params, prelude, loads + ops, values[-1]


def runtime_digest() -> str:
    """A digest of what generated kernels inline besides their own source: the helpers of
    numba_runtime.py and numba's version. Generated modules are cached by their source (file
    name and numba's cache, which checks only the generated file's own stamp), so without it a
    kernel compiled before an upgrade that changed a helper would keep running the old helper."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        numba_version = version("numba")
    except PackageNotFoundError:  # pragma: no cover - numba is a dependency
        numba_version = ""
    text = Path(__file__).with_name("numba_runtime.py").read_bytes() + numba_version.encode()
    return hashlib.sha256(text).hexdigest()[:16]


HEADER = (
    f"# helpers {runtime_digest()}\n"
    "import numpy as np\n"
    "from numba import njit\n"
    "from mergelang.runtime.kernels.numba_runtime import F8E4M3, F8E5M2, narrow_bf16, order_key, sel, widen_bf16\n"
    "Z = np.float32(0.0)\n"
    "ONE = np.float32(1.0)\n"
    "U0 = np.uint8(0)\n"
    "U1 = np.uint8(1)\n"
    "U64_0 = np.uint64(0)\n"
    "BLOCK = np.uint64(2048)\n"
    "\n"
)
JIT = "@njit(nogil=True, cache=True, error_model='numpy', boundscheck=False)\n"


def source(body: tuple, kinds: tuple[str, ...], dtypes: tuple[str, ...], models: int,
           out_dtype: str = "") -> str:
    """The generated module for one program with inputs of these dtypes (`out_dtype`
    "bfloat16": the float32 root is rounded to bfloat16 as it is stored; "bool": stored as
    bytes 0/1): `kernel(lo, hi, n, out, *inputs)` computes elements lo..hi-1."""
    fp8 = [j for j, k in enumerate(kinds) if k.startswith("fp8:")]
    segmented = len({kinds[j] for j in fp8}) == 1  # one block size: scales hoisted per block run
    params, prelude, lines, root = program_lines(body, kinds, dtypes, models, segmented)
    if out_dtype == "bfloat16":
        root = [f"narrow_bf16({v})" for v in root]
    elif out_dtype == "bool":
        root = [f"sel({v}, U1, U0)" for v in root]
    stores = [f"out[{flat_index(m)}] = {v}" for m, v in enumerate(root)]
    head = HEADER + JIT + f"def kernel(lo, hi, n, out, {', '.join(params)}):\n" + indent(prelude, 4)
    if segmented:
        return head + indent(_segments(kinds, fp8), 4) + indent(lines + stores, 12) + "        sp = send\n"
    return head + "    for i in range(np.uint64(lo), np.uint64(hi)):\n" + indent(lines + stores, 8)


def _block_shape(kind: str) -> tuple[int, int]:
    _, b0, b1 = kind.split(":")
    return int(b0), int(b1)


def _block_index(kind: str, j: int, i: str) -> str:
    """The flat index of element `i`'s block scale for FP8 input j (row-major blocks)."""
    b0, b1 = _block_shape(kind)
    return f"({i} // fc{j}) // np.uint64({b0}) * fg{j} + ({i} % fc{j}) // np.uint64({b1})"


def _segments(kinds: tuple[str, ...], fp8: list[int]) -> list[str]:
    """The loop over runs of elements that share every FP8 input's block scale (one row's
    columns of one block; every FP8 input has the root's shape and one block size): the scales
    `fq{j}` are read once per run, the inner loop over `i` is the plain element loop. (Names
    here and in `program_lines`'s FP8 lines start with `s` or `f`, apart from the kernels' own.)"""
    j0 = fp8[0]
    b0, b1 = _block_shape(kinds[j0])
    return (["sp = np.uint64(lo)", "shi = np.uint64(hi)", "while sp < shi:",
             f"    srow = sp // fc{j0}", f"    scol = sp - srow * fc{j0}",
             f"    sblk = srow // np.uint64({b0}) * fg{j0} + scol // np.uint64({b1})",
             f"    send = min(shi, sp + (np.uint64({b1}) - scol % np.uint64({b1})), srow * fc{j0} + fc{j0})"]
            + [f"    fq{j} = a{j + 1}[sblk]" for j in fp8] + ["    for i in range(sp, send):"])


def needed(lines: list[str], root: str) -> list[str]:
    """The lines `root` depends on (a model's slice of a program over several models)."""
    want, keep = set(_NAMES.findall(root)), []
    for line in reversed(lines):
        name, _, expr = line.partition(" = ")
        if name in want:
            keep.append(line)
            want |= set(_NAMES.findall(expr))
    return keep[::-1]


_NAMES = re.compile(r"[A-Za-z_]\w*")


def indent(lines: list[str], width: int) -> str:
    return "".join(" " * width + line + "\n" for line in lines)


def flat_index(m: int | None) -> str:
    """The flat index of element i of model m's slice (model 0 or a plain tensor: i)."""
    return f"o{m} + i" if m else "i"


def offsets(models: int) -> list[str]:
    """Prelude: each model's offset `o{m}` in a stacked input, unsigned like the index `i`.
    Unsigned indices matter: numba wraps a negative index around, and unless LLVM can prove an
    index non-negative, that check per access stops the loop from being vectorised (measured:
    a `range(lo, hi)` loop over signed indices ran ~20x slower than the same loop unsigned)."""
    return ["un = np.uint64(n)"] + [f"o{m} = np.uint64({m}) * un" for m in range(1, models)]


#: FP8 dtype -> the runtime's table of its 256 codes' float32 values
_FP8_TABLES = {"float8_e4m3fn": "F8E4M3", "float8_e5m2": "F8E5M2"}


def _is_bool(body, dtypes, kinds, ref) -> bool:
    kind, k = ref
    return (body[k][3] if kind == "v" else dtypes[k]) == "bool"


def _widen(dtype: str, expr: str) -> str:
    """A stored element as a value: bfloat16 bits widened to float32; a bool array is passed
    as its bytes (numba's loads from bool arrays kept LLVM from vectorising loops that read two
    of them: ~20x slower, measured), compared with 0 here."""
    if dtype == "bfloat16":
        return f"widen_bf16({expr})"
    return f"({expr} != U0)" if dtype == "bool" else expr


#: instruction -> its expression over the operands {0}, {1}, {2}
_TEMPLATES = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "{0} / {1}",
    "eq": "{0} == {1}", "ne": "{0} != {1}", "lt": "{0} < {1}", "le": "{0} <= {1}",
    "gt": "{0} > {1}", "ge": "{0} >= {1}", "neg": "-{0}", "abs": "abs({0})",
    "sign": "sel({0} > Z, ONE, Z) - sel({0} < Z, ONE, Z)",
    # NaN propagates; +0 never meets -0 here (fuse.py)
    "minimum": "sel({0} != {0}, {0}, sel({1} != {1}, {1}, sel({0} < {1}, {0}, {1})))",
    "maximum": "sel({0} != {0}, {0}, sel({1} != {1}, {1}, sel({0} > {1}, {0}, {1})))",
    "where": "sel({0}, {1}, {2})", "and": "{0} & {1}", "or": "{0} | {1}", "not": "not {0}",
}


def _expr(code: str, a: list[str]) -> str:
    return _TEMPLATES[code].format(*a)


def _cache_dir() -> Path:
    from mergelang.cachedir import cache_dir

    return cache_dir("fused") or Path(tempfile.mkdtemp(prefix="mergelang-fused-"))


def compiled(src: str):
    """The `kernel` of generated module `src` (see :func:`module`)."""
    return module(src).kernel


def module(src: str):
    """Generated module `src`, written to the cache dir and imported once per process."""
    digest = hashlib.sha256(src.encode()).hexdigest()[:20]
    with _LOCK:
        mod = _MODULES.get(digest)
        if mod is not None:
            return mod
        folder = _cache_dir()
        path = folder / f"fused_{digest}.py"
        if not path.is_file() or path.read_text() != src:
            tmp = folder / f".fused_{digest}.{os.getpid()}.tmp"
            tmp.write_text(src)
            os.replace(tmp, path)
        name = f"mergelang_fused_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        with warnings.catch_warnings():  # an unwritable numba cache only costs a recompile
            warnings.simplefilter("ignore")
            spec.loader.exec_module(mod)
        _MODULES[digest] = mod
        return mod


def _array(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A flat numpy view of `t` and its dtype name (float16 and the like: widened to float32)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).reshape(-1).numpy().view(np.uint16), "bfloat16"
    if t.dtype == torch.bool:
        return t.contiguous().reshape(-1).numpy().view(np.uint8), "bool"
    return t.to(torch.float32).contiguous().reshape(-1).numpy(), "float32"


def kernel_inputs(kinds: tuple[str, ...], args: list[torch.Tensor]) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """The kernel's input arrays and their dtype names."""
    arrays, dtypes = [], []
    for t, kind in zip(args, kinds):
        if kind.startswith("fp8:"):  # codes as stored, and the geometry its scales need
            cols, b1 = t.shape[1], _block_shape(kind)[1]
            arrays += [t.contiguous().view(torch.uint8).reshape(-1).numpy(),
                       np.array([cols, -(-cols // b1)], np.uint64)]
            dtypes.append(str(t.dtype).removeprefix("torch."))
            continue
        if kind == "fp8scale":  # read as float32 by its codes' lines (bfloat16 scales widened here)
            arrays.append(t.to(torch.float32).contiguous().reshape(-1).numpy())
            dtypes.append("float32")
            continue
        scalar = kind in ("scalar", "mscalar") and t.dtype == torch.bfloat16
        a, dt = _array(t.to(torch.float32) if scalar else t)  # scalars: widened here, once
        arrays.append(a)
        dtypes.append(dt)
    return arrays, tuple(dtypes)


def run(node, args: list[torch.Tensor]) -> torch.Tensor:
    """The FUSED node's value: its program's kernel over `args` (CPU tensors); with attr
    `select`, see `numba_topk.run_select` (the table's FUSED kernel dispatches)."""
    body, kinds, models = node.attrs["body"], node.attrs["inputs"], node.attrs["models"]
    arrays, dtypes = kernel_inputs(kinds, args)
    ty = node.type
    fn = compiled(source(body, kinds, dtypes, models, ty.dtype if ty.dtype in ("bfloat16", "bool") else ""))
    out = torch.empty(ty.full_shape, dtype={"bool": torch.bool, "bfloat16": torch.bfloat16}.get(
        ty.dtype, torch.float32))
    if ty.dtype == "bfloat16":
        flat = out.reshape(-1).view(torch.int16).numpy().view(np.uint16)
    else:
        flat = out.reshape(-1).numpy()
        flat = flat.view(np.uint8) if ty.dtype == "bool" else flat
    n = math.prod(ty.shape)
    threads = threads_for(out.numel())
    if threads <= 1:
        fn(0, n, n, flat, *arrays)
        return out
    cuts = [n * k // threads for k in range(threads + 1)]
    parallel_map(lambda lo, hi: fn(lo, hi, n, flat, *arrays), cuts[:-1], cuts[1:], threads=threads)
    return out
