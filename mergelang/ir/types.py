"""Value types of graph nodes and the dtype vocabulary shared by checker, kernels and I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# safetensors header dtype <-> the torch dtype names used in recipes and --emit output. Plain
# tables, so that checking a recipe (headers only) never imports torch; the torch dtype tables
# (ST_TO_TORCH, TORCH_TO_ST, NAME_TO_TORCH) are built on first use (module __getattr__).
ST_TO_NAME: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
    "U64": "uint64",
}
NAME_TO_ST = {v: k for k, v in ST_TO_NAME.items()}
ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint16": 2,
    "uint32": 4, "uint64": 8,
}
FLOATING = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
           "bf16": "bfloat16", "fp64": "float64", "double": "float64"}

SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "bool": "bool",
         "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8"}

#: dtypes a recipe's `dtype` option may name for the output
OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _torch_tables() -> dict[str, Any]:
    import torch

    st = {k: getattr(torch, v) for k, v in ST_TO_NAME.items() if hasattr(torch, v)}
    tables = {"ST_TO_TORCH": st, "TORCH_TO_ST": {v: k for k, v in st.items()},
              "NAME_TO_TORCH": {ST_TO_NAME[k]: v for k, v in st.items()}}
    globals().update(tables)
    return tables


def __getattr__(name: str) -> Any:
    if name in ("ST_TO_TORCH", "TORCH_TO_ST", "NAME_TO_TORCH"):
        return _torch_tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dt: "torch.dtype") -> str:
    return str(dt).removeprefix("torch.")


def torch_dtype(name: str) -> "torch.dtype":
    tables = globals().get("NAME_TO_TORCH") or _torch_tables()["NAME_TO_TORCH"]
    return tables[ALIASES.get(name, name)]


def is_floating(name: str) -> bool:
    return ALIASES.get(name, name) in FLOATING


def itemsize(name: str) -> int:
    return ITEMSIZE[ALIASES.get(name, name)]


@dataclass(frozen=True)
class TType:
    """The type of a graph value: an element shape, a dtype and, for a stack of per-model
    tensors, the length of the leading model axis (`models`; None for a plain tensor)."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    models: int | None = None

    @property
    def full_shape(self) -> tuple[int, ...]:
        return self.shape if self.models is None else (self.models, *self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.full_shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def stacked(self) -> bool:
        return self.models is not None

    def with_(self, **changes) -> "TType":
        return replace(self, **changes)

    def __str__(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        prefix = f"{self.models} x " if self.models is not None else ""
        return f"{SHORT.get(self.dtype, self.dtype)}[{prefix}{dims}]"


SCALAR = TType(())
BOOL_SCALAR = TType((), "bool")


def broadcast_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """numpy/torch broadcasting of element shapes; None when they do not broadcast."""
    out = []
    for x, y in zip(reversed((1,) * (len(b) - len(a)) + a), reversed((1,) * (len(a) - len(b)) + b)):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))


def broadcast_all(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast of several shapes: `torch.broadcast_shapes` without its first call's import of
    torch's symbolic-shape machinery (~500 modules, measured 0.36 s of a run); ValueError when
    they do not broadcast."""
    out: tuple[int, ...] = ()
    for shape in shapes:
        b = broadcast_shapes(out, tuple(shape))
        if b is None:
            raise ValueError(f"shapes {', '.join(format_shape(tuple(s)) for s in shapes)} do not broadcast")
        out = b
    return out


def format_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def parse_bytes(text: str | int) -> int:
    """'8GB' / '5 GiB' / 1000 -> bytes (pydantic's ByteSize: decimal GB, binary GiB)."""
    from pydantic import ByteSize, TypeAdapter

    return int(TypeAdapter(ByteSize).validate_python(text))


def format_bytes(n: int | float) -> str:
    """A byte count in binary units, the one convention of every message: `512 B`, `1.5 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def plural(n: int, word: str) -> str:
    """`1 warning`, `2 warnings`."""
    return f"{n} {word}{'' if n == 1 else 's'}"
