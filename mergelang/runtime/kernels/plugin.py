"""The kernel of PLUGIN nodes: a merge method written in Python (lang/plugins.py), called with
the node's tensors (positional, in the method's order) and compile-time values (keywords). Its
result must be a tensor of the declared shape; anything else, or an exception inside the
method, stops the merge with E117 naming the method and the tensor."""

from __future__ import annotations

import torch

from mergelang.ir.graph import Node
from mergelang.ir.ops import Op
from mergelang.runtime.kernels.registry import KERNELS, CheckFailed


class PluginFailed(CheckFailed):
    """A plugin method raised or returned something other than its declared tensor (E117)."""

    code = "E117"


def run_plugin(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    from mergelang.lang.plugins import lookup

    name = node.attrs["name"]
    try:
        m = lookup(node.attrs["origin"], name)
        out = m.fn(*args, **dict(node.attrs["values"]))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code: reported, never a traceback
        raise PluginFailed(f"plugin method `{name}` failed: {type(exc).__name__}: {exc}") from None
    want = node.type.full_shape
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise PluginFailed(f"plugin method `{name}` returned {got}, its shape rule promised {want}")
    if not out.is_floating_point() or out.device.type == "meta":
        what = "a meta tensor (no values)" if out.device.type == "meta" else f"{out.dtype} values"
        raise PluginFailed(f"plugin method `{name}` returned {what}, not float values")
    return out.to(torch.float32)


KERNELS[Op.PLUGIN] = run_plugin
