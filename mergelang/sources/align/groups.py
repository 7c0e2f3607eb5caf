"""Permutation groups: which tensor axes a group permutes (`Member`, `Group`, `AlignSpec`), and
applying one permutation to one tensor. The lowest layer of `align`: `spec.py` (built-in specs),
`soft.py` (soft OT maps) and `solve.py` build on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from mergelang.errors import CodedError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Member:
    tensor: str
    axis: int
    repeat: int = 1
    block: int = 1
    start: int = 0


@dataclass(frozen=True)
class Group:
    name: str
    size: int
    members: tuple[Member, ...]


@dataclass(frozen=True)
class AlignSpec:
    arch: str
    groups: tuple[Group, ...]
    note: str = ""  # what the spec leaves fixed, for docs and --emit

    def by_tensor(self) -> dict[str, list[tuple[Group, Member]]]:
        out: dict[str, list[tuple[Group, Member]]] = {}
        for g in self.groups:
            for m in g.members:
                out.setdefault(m.tensor, []).append((g, m))
        return out

    def tensors(self) -> list[str]:
        return list(self.by_tensor())

    def check(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """Problems of this spec against a model's tensor shapes (empty: the spec fits)."""
        problems = []
        for g in self.groups:
            for m in g.members:
                shape = shapes.get(m.tensor)
                if shape is None:
                    problems.append(f"group `{g.name}`: tensor `{m.tensor}` is missing")
                    continue
                if not -len(shape) <= m.axis < len(shape):
                    problems.append(f"group `{g.name}`: `{m.tensor}` has no axis {m.axis}")
                    continue
                need = m.start + m.repeat * g.size * m.block
                if need > shape[m.axis]:
                    problems.append(f"group `{g.name}` (size {g.size}) needs {need} positions on axis "
                                    f"{m.axis} of `{m.tensor}`, which has {shape[m.axis]}")
        return problems


class SpecError(CodedError):
    """No built-in spec fits this model (E603 at the `align` call; E605 for custom groups)."""

    default_code = "E603"


# ------------------------------------------------------------------ index maps
def member_index(m: Member, n: int, length: int, perm: torch.Tensor) -> torch.Tensor:
    """The gather index along the member's axis (length `length`) for permutation `perm`."""
    import torch

    idx = torch.arange(length, dtype=torch.long, device=perm.device)
    inner = perm.view(1, n, 1) * m.block + torch.arange(m.block, device=perm.device).view(1, 1, m.block)
    inner = inner + torch.arange(m.repeat, device=perm.device).view(m.repeat, 1, 1) * (n * m.block)
    idx[m.start : m.start + m.repeat * n * m.block] = m.start + inner.reshape(-1)
    return idx


def units_view(t: torch.Tensor, m: Member, n: int) -> torch.Tensor:
    """The member's covered slice as an (n, -1) matrix: one row per permuted unit."""
    x = t.movedim(m.axis, 0)[m.start : m.start + m.repeat * n * m.block]
    x = x.reshape(m.repeat, n, m.block, -1).transpose(0, 1)
    return x.reshape(n, -1)


def permute_tensor(t: torch.Tensor, members: Sequence[tuple[Group, Member]],
                   perms: Mapping[str, torch.Tensor], skip: str | None = None) -> torch.Tensor:
    import torch

    for g, m in members:
        if g.name == skip:
            continue
        p = perms[g.name].to(t.device)
        if torch.equal(p, torch.arange(g.size, device=p.device)):
            continue
        t = t.index_select(m.axis, member_index(m, g.size, t.shape[m.axis], p))
    return t
