"""Merge methods written in Python: the `@mergelang.method` decorator, where plugins come from,
and the intrinsic each becomes.

A plugin is a torch function declared with its signature (from its annotations: `torch.Tensor`
parameters take tensors, `list[torch.Tensor]` a stack of models with the model axis first,
`float` / `int` / `bool` / `str` parameters compile-time values), an optional shape rule and
whether it is elementwise. The compiler then checks a call from the headers like any method
(shapes, arity, keywords), plans its memory, and streams it row by row under a memory budget
when it is elementwise; the kernel runs the function on the tensors (runtime/kernels/plugin.py).

Plugins come from two places, and both run Python code in the mergelang process:
- `import "methods.py"` in a recipe, refused unless the user opts in (`--allow-plugins`,
  `allow_plugins=True`): a recipe cannot opt itself in (E116);
- installed packages, through the entry-point group `mergelang.methods` (entry point name = the
  method's name, value = `module:function` of a decorated function), loaded only when a recipe
  calls a name that nothing else defines.
`check` says which Python code a recipe runs (W005).
"""

from __future__ import annotations

import hashlib
import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mergelang.diagnostics import CompileError, Diagnostics, Span, error, warning

#: the entry-point group installed packages register their methods under
ENTRY_POINT_GROUP = "mergelang.methods"

_KINDS = {float: "number", int: "whole number", bool: "bool", str: "string"}


class PluginError(ValueError):
    """A plugin declared wrongly (bad annotations, bad shape rule): becomes E115."""


@dataclass(frozen=True)
class PluginMethod:
    """A merge method written in Python (see the module doc). Calling it calls the function."""

    name: str
    fn: Callable[..., Any]
    #: (name, kind: tensor | stack | number | bool | string, default or inspect.Parameter.empty)
    params: tuple[tuple[str, str, Any], ...]
    elementwise: bool
    shape: Callable[..., Any] | None
    doc: str
    origin: str = ""  # where it was loaded from: "file:PATH#SHA256" or "entry:module:function"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(n for n, k, _ in self.params if k in ("tensor", "stack"))


def method(fn: Callable[..., Any] | None = None, *, name: str | None = None, elementwise: bool = False,
           shape: Callable[..., Any] | None = None) -> Any:
    """Declare a merge method written in Python (usable as `@method` or `@method(...)`).

    `elementwise=True` promises that each output element depends only on the input elements at
    the same position (then the merge may stream it in row chunks); `shape(*shapes, **values)`
    returns the output shape from the tensor arguments' shapes (default: their broadcast shape
    when elementwise, else the first tensor's shape). The output is float32."""
    def deco(f: Callable[..., Any]) -> PluginMethod:
        return PluginMethod(name or f.__name__, f, _params(f), bool(elementwise), shape,
                            inspect.getdoc(f) or "")
    return deco(fn) if fn is not None else deco


def _params(f: Callable[..., Any]) -> tuple[tuple[str, str, Any], ...]:
    import torch

    try:
        hints = typing.get_type_hints(f)
    except Exception as exc:  # noqa: BLE001 - an annotation that does not evaluate
        raise PluginError(f"cannot read the annotations of `{f.__name__}`: {exc}") from None
    out = []
    for p in inspect.signature(f).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise PluginError(f"`{f.__name__}` takes *{p.name}: a method's parameters are named")
        hint = hints.get(p.name)
        if hint is torch.Tensor:
            kind = "tensor"
        elif typing.get_origin(hint) in (list, tuple, typing.get_origin(typing.Sequence[int])) \
                and typing.get_args(hint)[:1] == (torch.Tensor,):
            kind = "stack"
        elif hint in _KINDS:
            kind = _KINDS[hint]
        else:
            raise PluginError(f"parameter `{p.name}` of `{f.__name__}` needs an annotation: "
                              "torch.Tensor, list[torch.Tensor], float, int, bool or str")
        if kind in ("tensor", "stack") and p.default is not p.empty:
            raise PluginError(f"tensor parameter `{p.name}` of `{f.__name__}` cannot have a default")
        out.append((p.name, kind, p.default))  # inspect.Parameter.empty: required
    if not any(k in ("tensor", "stack") for _, k, _ in out):
        raise PluginError(f"`{f.__name__}` takes no tensor parameter")
    return tuple(out)


# ---------------------------------------------------------------- loading
#: origin -> {name: method}: every plugin this process loaded (kernels look methods up here)
_LOADED: dict[str, dict[str, PluginMethod]] = {}


def load_file(path: Path) -> dict[str, PluginMethod]:
    """The methods a plugin file declares (run once per path and content). Raises OSError,
    ValueError, PluginError, or whatever the file itself raises."""
    from mergelang.lang.loader import read_recipe_file

    text = read_recipe_file(path).text
    origin = f"file:{path.resolve()}#{hashlib.sha256(text.encode()).hexdigest()}"
    if origin in _LOADED:
        return _LOADED[origin]
    module = types.ModuleType(f"mergelang_plugin_{hashlib.sha256(origin.encode()).hexdigest()[:12]}")
    module.__file__ = str(path)
    exec(compile(text, str(path), "exec"), module.__dict__)  # noqa: S102 - the opted-in plugin
    found = {m.name: _with_origin(m, origin) for m in vars(module).values() if isinstance(m, PluginMethod)}
    _LOADED[origin] = found
    return found


def _with_origin(m: PluginMethod, origin: str) -> PluginMethod:
    from dataclasses import replace

    return replace(m, origin=origin)


def entry_point_methods(names: set[str]) -> dict[str, tuple[PluginMethod | Exception, str]]:
    """Installed methods (entry-point group `mergelang.methods`) among `names`: name ->
    (method, or the exception its loading raised; the entry point's value)."""
    from importlib.metadata import entry_points

    out: dict[str, tuple[PluginMethod | Exception, str]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in names or ep.name in out:
            continue
        origin = f"entry:{ep.value}"
        try:
            if origin in _LOADED:
                out[ep.name] = (_LOADED[origin][ep.name], ep.value)
                continue
            obj = ep.load()
            if not isinstance(obj, PluginMethod) or obj.name != ep.name:
                raise PluginError(f"entry point `{ep.name} = {ep.value}` is not a function decorated "
                                  f"with @mergelang.method(name = \"{ep.name}\")")
            m = _with_origin(obj, origin)
            _LOADED[origin] = {ep.name: m}
            out[ep.name] = (m, ep.value)
        except Exception as exc:  # noqa: BLE001 - reported as E114 at the call
            out[ep.name] = (exc, ep.value)
    return out


def lookup(origin: str, name: str) -> PluginMethod:
    """The method a PLUGIN node names (loading it again in a fresh process, e.g. a worker)."""
    found = _LOADED.get(origin)
    if found is None:
        if origin.startswith("file:"):
            path, _, sha = origin[5:].rpartition("#")
            found = load_file(Path(path))
            if origin not in _LOADED:
                raise PluginError(f"plugin file {path} changed since the recipe was compiled")
        else:
            entry_point_methods({name})
            found = _LOADED.get(origin, {})
    if name not in found:
        raise PluginError(f"plugin method `{name}` is not in {origin}")
    return found[name]


def load_plugins(files: list[tuple[Path, Span]], called: set[str], known: set[str], allow: bool,
                 diags: Diagnostics) -> dict[str, PluginMethod]:
    """The plugin methods a recipe may call: those of its `import "*.py"` files (E116 without
    `allow`) and the installed ones among the names it calls that nothing else defines."""
    out: dict[str, PluginMethod] = {}
    for path, span in files:
        if not allow:
            diags.add(error("E116", f"`import \"{path.name}\"` runs Python code, and plugins are off",
                            span, "pass --allow-plugins (Python: allow_plugins=True) if you trust "
                            "this file; a recipe cannot turn plugins on by itself"))
            continue
        try:
            found = load_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            diags.add(error("E114", f"cannot read plugin file {path}: {reason}", span))
            continue
        except PluginError as exc:
            diags.add(error("E115", str(exc), span))
            continue
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the plugin's own code failed on import
            diags.add(error("E114", f"plugin file {path.name} failed on import: "
                            f"{type(exc).__name__}: {exc}", span))
            continue
        if not found:
            diags.add(warning("W006", f"plugin file {path.name} declares no @mergelang.method", span))
        for name, m in found.items():
            if name in known or name in out:
                where = "another plugin file's method" if name in out else \
                    "a built-in, standard-library or recipe function"
                diags.add(error("E115", f"plugin method `{name}` has the name of {where}", span,
                                "give it another name"))
                continue
            out[name] = m
        diags.add(warning("W005", f"this recipe runs Python code from {path} (methods: "
                          f"{', '.join(sorted(found)) or 'none'})", span,
                          "plugins run with your permissions; read the file before trusting it"))
    wanted = called - known - set(out)
    for name, (m, value) in sorted(entry_point_methods(wanted).items()):
        if isinstance(m, Exception):
            diags.add(error("E114", f"installed method `{name}` ({value}) failed to load: "
                            f"{type(m).__name__}: {m}", None))
            continue
        out[name] = m
        diags.add(warning("W005", f"method `{name}` is Python code from an installed package "
                          f"({value}, entry point group {ENTRY_POINT_GROUP})", None))
    return out


def plugins_for(unit: Any, allow: bool, diags: Diagnostics) -> dict[str, PluginMethod]:
    """The Python methods the recipe may call (lang/plugins.py): its plugin files' (when
    allowed) and installed ones among the names it calls that nothing else defines."""
    from mergelang.lang.intrinsics import INTRINSICS

    from mergelang.lang.ast import expr_calls

    called = expr_calls((unit.program, *(f for f in unit.fns.values() if not f.span.source.library)))
    if not unit.plugin_files and called <= set(unit.fns) | set(INTRINSICS):
        return {}
    found = load_plugins(unit.plugin_files, called, set(unit.fns) | set(INTRINSICS), allow, diags)
    if any(d.code == "E116" for d in diags.items):  # its methods' names would all be E102 noise
        diags.raise_if_errors()
    return found


# ---------------------------------------------------------------- calls
def as_intrinsic(m: PluginMethod) -> Any:
    """The intrinsic a plugin method is called as: it checks the call from the types and adds
    one PLUGIN node (attrs: name, origin, the compile-time values, the result type)."""
    from mergelang.lang.intrinsics.registry import Intrinsic
    from mergelang.lang.values import REQUIRED, Param, Signature

    sig = Signature(m.name, tuple(Param(n, REQUIRED if d is inspect.Parameter.empty else d)
                                  for n, _, d in m.params), m.doc)

    def impl(el: Any, a: dict[str, Any], span: Span) -> Any:
        from mergelang.ir.ops import Attrs, Op
        from mergelang.ir.types import TType, broadcast_shapes
        from mergelang.lang.values import TensorV

        nodes, shapes, values = [], [], {}
        for name, kind, _ in m.params:
            v = a[name]
            if kind in ("tensor", "stack"):
                nid = el.to_node(v, span)
                t = el.graph.node(nid).type
                if (kind == "stack") != t.stacked:
                    want = "a list of models (a stack)" if kind == "stack" else "one tensor, not a list"
                    raise CompileError(error("E115", f"`{m.name}`'s `{name}` takes {want}", span,
                                             f"signature: {sig.render()}"))
                if t.dtype != "float32":
                    raise CompileError(error("E201", f"`{m.name}`'s `{name}` needs float values, "
                                             f"got {t.dtype}", span))
                nodes.append(nid)
                shapes.append(t.shape)
            else:
                values[name] = _value(el, m, name, kind, v, span)
        try:
            if m.shape is not None:
                out = tuple(int(d) for d in m.shape(*shapes, **values))
            elif m.elementwise:
                out = shapes[0]
                for sh in shapes[1:]:
                    b = broadcast_shapes(out, sh)
                    if b is None:
                        raise PluginError(f"shapes {shapes} do not broadcast")
                    out = b
            else:
                out = shapes[0]
        except Exception as exc:  # noqa: BLE001 - the plugin's shape rule refused or failed
            raise CompileError(error("E115", f"`{m.name}`'s shape rule failed: {type(exc).__name__}: "
                                     f"{exc}", span)) from None
        attrs = Attrs(name=m.name, origin=m.origin, values=tuple(sorted(values.items())),
                      elementwise=m.elementwise, type=TType(out))
        return TensorV(el.make(Op.PLUGIN, nodes, attrs, span))

    return Intrinsic(sig, impl)


def _value(el: Any, m: PluginMethod, name: str, kind: str, v: Any, span: Span) -> Any:
    """A compile-time argument as the Python value the function receives."""
    from mergelang.lang.values import Const, Deferred

    ok = isinstance(v, Const) and not isinstance(v.value, Deferred) and (
        v.value is None or (kind == "number" and isinstance(v.value, (int, float))
                            and not isinstance(v.value, bool))
        or (kind == "whole number" and isinstance(v.value, int) and not isinstance(v.value, bool))
        or (kind == "bool" and isinstance(v.value, bool)) or (kind == "string" and isinstance(v.value, str)))
    if not ok:
        raise CompileError(error("E115", f"`{m.name}`'s `{name}` takes a {kind} known at compile "
                                 f"time, got {v.describe()}", span))
    return v.value
