"""Hypothesis strategies and targets shared by tests/test_fuzz.py (small, in CI) and
scripts/fuzz.py (long runs): random and mutated recipes for the parser and checker, random and
mutated files for the safetensors header reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergelang.io.checkpoint import CheckpointError, read_header
from mergelang.compiler import compile_recipe
from mergelang.diagnostics import MergelangError, SourceFile

SEEDS = [
    '''model a = "models/a"
model b = "models/b"
param t = 0.3
option dtype = "bfloat16"
## a user function
fn mix(x, y, w = 0.5) {
    let d = y - x
    return x + w * d
}
merge from a {
    "layers.{i}.weight" if i < 2 => slerp(a, b, t = i / 4)
    re"norm\\..*" => a
    "*" => mix(a, b, w = t)
}
''',
    '''model a = "models/a"
model b = "models/b"
model c = "models/c"
param density = 0.5
merge from a {
    "norm.weight" => passthrough(b, scale = 2)
    "*" => ties(a, [b, c], weights = [1, 0.5], density = density)
}
''',
    '''model a = "models/a"
model b = "models/b"
model c = "models/c"
merge from b {
    "layers.{i}.*" => task_arithmetic(a, [b, c], lambda = if i > 1 then 0.5 else 1.0)
    "*" => linear([a, b, c], weights = [1, 2, 3])
}
''',
]

TOKENS = ["model", "param", "option", "fn", "let", "return", "merge", "from", "import", "if",
          "then", "else", "and", "or", "not", "true", "false", "none", "{", "}", "(", ")", "[",
          "]", "=", "=>", ",", "+", "-", "*", "/", "<", ">=", "==", ".", "\"*\"",
          "\"layers.{i}.*\"", "\"{i}\"", "re\"(\"", "re\".*\"", "\"models/a\"", "\"/nonexistent\"",
          "a", "b", "c", "i", "x", "t", "linear", "ties", "slerp", "task_arithmetic", "passthrough",
          "sum", "mean", "abs", "where", "over", "\"models\"", "\"rows\"", "density", "weights",
          "0", "1", "0.5", "-1", "1e400", "1e-400", "99999999999999999999", "\n", " ", "\t", "#",
          "##", "\"", "\\", "'", "\u00e9", "\u200b", "\x00", "dtype", "shard_size", "\"bf16\"",
          "\"1KB\"", "\"-5\"", "nan_check"]

token_soup = st.lists(st.sampled_from(TOKENS), max_size=60).map(" ".join)
recipe_text = st.one_of(st.text(max_size=200), token_soup)


@st.composite
def mutated_recipe(draw) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        n = len(text)
        i = draw(st.integers(0, n))
        j = draw(st.integers(i, min(n, i + 20)))
        op = draw(st.sampled_from(["delete", "insert", "replace", "duplicate", "swap_lines"]))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif op == "replace":
            text = text[:i] + draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=5))) + text[j:]
        elif op == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        else:
            lines = text.split("\n")
            a = draw(st.integers(0, len(lines) - 1))
            b = draw(st.integers(0, len(lines) - 1))
            lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
    return text


def make_models(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    for m in ("a", "b", "c"):
        folder = root / "models" / m
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"layers.{i}.weight": torch.randn(4, 3, generator=g) for i in range(4)}
        tensors["norm.weight"] = torch.randn(3, generator=g)
        save_file(tensors, folder / "model.safetensors")
    return root


def check_recipe(text: str, root: Path) -> None:
    """Parse + check + build + plan `text`: a MergelangError (diagnostics) or success only."""
    try:
        compile_recipe(SourceFile("<fuzz>", text), root).close()
    except MergelangError as exc:
        for d in exc.diagnostics:
            d.render()  # rendering must not fail either
            assert d.code, d


# ---------------------------------------------------------------------------------- headers

def valid_file(dtype: torch.dtype = torch.float32) -> bytes:
    import io
    from safetensors.torch import save

    t = {"w": torch.arange(12.0).reshape(3, 4).to(dtype), "b": torch.ones(3).to(dtype)}
    return io.BytesIO(save(t)).getvalue()


VALID = valid_file()

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                        st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)), max_leaves=12)
entry = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "C64", "F8_E4M3", ""]),
                       json_value),
    "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_value),
    "data_offsets": st.one_of(st.lists(st.integers(-10, 2**66), min_size=2, max_size=2),
                              st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list), json_value),
})
header_dict = st.dictionaries(st.text(max_size=6), st.one_of(entry, json_value), max_size=4)


@st.composite
def mutated_header_file(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "flip", "truncate", "length", "json"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    data = bytearray(VALID)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + bytes(data[8:])
    header = json.dumps(draw(header_dict)).encode()
    return struct.pack("<Q", len(header)) + header + draw(st.binary(max_size=128))


def check_header(data: bytes, path: Path) -> None:
    """read_header on `data`: a CheckpointError or a table consistent with the file."""
    path.write_bytes(data)
    try:
        table = read_header(path)
    except CheckpointError as exc:
        assert str(exc)
        return
    for info in table.values():
        assert 0 <= info.begin <= info.end <= len(data)
        assert info.end - info.begin == info.nbytes
    # what the checker accepts, the data reader (safetensors) must read: no late surprises
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(table)
        for name, info in table.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == info.shape


# ---------------------------------------------------------------------- past the parser: runs

def check_run(text: str, root: Path) -> None:
    """Compile `text` and, when it compiles, run it in memory on the tiny models: a
    MergelangError (diagnostics) or success only, never another exception."""
    from mergelang.api import Recipe

    try:
        c = compile_recipe(SourceFile("<fuzz>", text), root)
    except MergelangError as exc:
        for d in exc.diagnostics:
            assert d.code and d.render()
        return
    try:
        Recipe(c).evaluate()
    except MergelangError as exc:
        for d in exc.diagnostics:
            assert d.code and d.render()
    finally:
        c.close()


WRAPPERS = {
    "neg": lambda e: f"-{e}", "not": lambda e: f"not {e}", "paren": lambda e: f"({e})",
    "list": lambda e: f"[{e}]", "call": lambda e: f"abs({e})", "sum": lambda e: f"{e} + 1",
    "pow": lambda e: f"2 ** {e}", "index": lambda e: f"[{e}, 1][0]",
    "if": lambda e: f"if true then {e} else 0",
}
ATOMS = ["1", "0.5", "a", "b", "-0.0", "1e308", "1e-320", "true", "none", '"s"', "i"]


@st.composite
def hostile_recipe(draw) -> str:
    """Deep nesting (past the parser's bound too), long literals, huge arithmetic, placed in a
    param, a rule or a function body."""
    depth = draw(st.integers(0, 260))
    wrap = [draw(st.sampled_from(sorted(WRAPPERS))) for _ in range(min(depth, 8))]
    atom = draw(st.one_of(st.sampled_from(ATOMS),
                          st.integers(1, 6000).map(lambda n: "9" * n),
                          st.integers(1, 400).map(lambda n: "1" + "0" * n + ".5")))
    expr = atom
    for k in range(depth):
        expr = WRAPPERS[wrap[k % len(wrap)]](expr) if wrap else expr
    place = draw(st.sampled_from(["param", "rule", "fn", "guard"]))
    head = 'model a = "models/a"\nmodel b = "models/b"\n'
    if place == "param":
        return head + f"param p = {expr}\n" + 'merge from a { "*" => a * p }\n'
    if place == "rule":
        return head + f'merge from a {{ "*" => {expr} }}\n'
    if place == "fn":
        return head + f"fn f(x) {{ return {expr} }}\n" + 'merge from a { "*" => f(a) }\n'
    return head + f'merge from a {{ "layers.{{i}}.*" if {expr} => b\n "*" => a }}\n'


ODD_DIMS = [0, 1, 3, 2 ** 31, 2 ** 32 + 1, 2 ** 40, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -1]


@st.composite
def odd_shape_model(draw) -> bytes:
    """A safetensors file whose one tensor has an odd (often absurd) shape, with offsets that
    match the shape's byte size when that size is small (so the header is otherwise valid)."""
    shape = draw(st.lists(st.sampled_from(ODD_DIMS), min_size=0, max_size=4))
    n = 1
    for d in shape:
        n *= d
    size = n * 4 if 0 <= n * 4 <= 4096 else draw(st.integers(0, 64)) * 4
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\0" * size


def check_odd_model(data: bytes, root: Path) -> None:
    """A model folder holding `data`: check and run a recipe over it; diagnostics only."""
    folder = root / "models" / "odd"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)
    check_run('model o = "models/odd"\nmerge from o { "*" => o * 2 + 1 }\n', root)
