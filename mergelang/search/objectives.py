"""Helpers for objectives and losses (`ml.objectives`), and loading `FILE.py:FUNC` from the CLI.

* `entropy(logits)`: AdaMerging's objective, the mean Shannon entropy of the softmax
  predictions (minimise it on unlabeled data).
* `forward(module, state, *args, **kwargs)`: run a torch / transformers model skeleton with the
  merged tensors as its weights (`torch.func.functional_call`: no copy into the module, and
  differentiable w.r.t. the tensors, which `learn` needs).
* `accuracy(logits, labels)`.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, Callable, Mapping

from mergelang.diagnostics import MergelangError, error
from mergelang.io.textfile import read_text, reason
from mergelang.lang.loader import MAX_RECIPE_BYTES


def entropy(logits: Any) -> Any:
    """Mean over the batch of H(softmax(logits)) over the last axis (nats)."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def accuracy(logits: Any, labels: Any) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def forward(module: Any, state: Mapping[str, Any], *args: Any, strict: bool = False,
            **kwargs: Any) -> Any:
    """`module(*args, **kwargs)` computed with `state`'s tensors in place of its parameters and
    buffers (those `state` lacks keep the module's own). Tied weights stay tied."""
    from torch.func import functional_call

    return functional_call(module, dict(state), args, kwargs, strict=strict, tie_weights=True)


def load_function(spec: str, what: str = "objective") -> Callable[..., Any]:
    """`FILE.py:FUNC` -> the function (E905 when the file or the function is missing, or the
    file fails to import)."""
    fn = load_value(spec, what)
    if not callable(fn):
        raise MergelangError(error("E905", f"--{what} {spec}: `{spec.rpartition(':')[2]}` is "
                                   f"a {type(fn).__name__}, not a function"))
    return fn


def load_value(spec: str, what: str = "data") -> Any:
    """`FILE.py:NAME` -> the module attribute NAME (E905 when missing)."""
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise MergelangError(error("E905", f"--{what} {spec!r} is not FILE.py:FUNC", None,
                                   f"e.g. --{what} eval.py:score"))
    path = Path(path_text)
    if not path.is_file():
        raise MergelangError(error("E905", f"--{what}: no file {path}", None,
                                   f"give the Python file that defines `{name}`"))
    try:
        text = read_text(path, MAX_RECIPE_BYTES)
    except (OSError, ValueError) as exc:
        raise MergelangError(error("E905", f"--{what}: cannot read {path}: {reason(exc)}")) from None
    return module_attribute(module_from_source(text, path, what), name, path, what)


def module_from_source(text: str, path: Path, what: str = "objective") -> Any:
    """A module executed from `text` as if imported from `path` (its folder importable): the
    CLI's objective file, and the same file's text shipped to Ray workers."""
    path = Path(path).resolve()
    mod_name = f"_mergelang_{what}_{abs(hash(str(path)))}"
    module = types.ModuleType(mod_name)
    module.__file__ = str(path)
    sys.modules[mod_name] = module  # dataclasses and pickling look modules up by name
    folder = str(path.parent)
    if folder not in sys.path:  # the file may import its neighbours, as `python FILE.py` would
        sys.path.append(folder)
    try:
        exec(compile(text, str(path), "exec"), module.__dict__)  # noqa: S102 - the user's own file
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - sys.exit on import must not end mergelang
        sys.modules.pop(mod_name, None)
        why = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        raise MergelangError(error("E905", f"--{what}: importing {path} failed: {why}", None,
                                   "run the file with python to see the full error")) from None
    return module


def module_attribute(module: Any, name: str, path: Path, what: str) -> Any:
    if not hasattr(module, name):
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
        raise MergelangError(error("E905", f"--{what}: {path} defines no `{name}`", None,
                                   f"functions there: {', '.join(names) or 'none'}"))
    return getattr(module, name)
