"""Alignment from activations: `align(b, to = a, by = "activations", stats = c)`.

`c` is a correlation sidecar written by `mergelang stats A B --kind correlation` (data/correlation.py):
per *activation site* (the input, or output, features of a linear layer whose weight is a member
of a permutation group on that axis) the L x L cross-correlation `corr[i, j]` between feature
`i` of the reference A and feature `j` of B on the same inputs.

The permutations are solved by the same coordinate descent as weight matching (`solve.descend`),
with the similarity of unit `i` of A and unit `j` of B for a group being the sum, over its
sites and its members on each site's axis, of the correlations of the features that make up the
units (`corr[(r, i, b), (r, j, b)]` summed over the repeats `r` and the block positions `b`,
with the other groups acting on the same axis applied to B's side). For a group that is alone
on its axes (MLP hidden units, a plain MLP's layers) this is one linear assignment maximising
the summed correlation, as ZipIt! / git re-basin's activation matching do; the permutations are
then applied on load exactly as weight matching's (`AlignedSource`). A group the sidecar gives no
site (W147 when it was written) keeps the identity.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

from mergelang.errors import CodedError
from mergelang.sources.align.groups import AlignSpec, Group, permute_tensor
from mergelang.sources.align.solve import MAX_SWEEPS, AlignResult, descend

STATS_FILE = "mergelang_stats.json"
BY = ("weights", "activations")


class StatsError(CodedError):
    """The correlation sidecar is missing, not a correlation sidecar, or does not fit the spec."""

    default_code = "E968"


def read_info(folder: Path | None) -> dict[str, Any]:
    """The sidecar's mergelang_stats.json (E968 when absent, unreadable or not `correlation`)."""
    from mergelang.io.textfile import read_json, reason

    if folder is None:
        raise StatsError("it is not a local folder (a single file?): give the sidecar folder "
                         "written by `mergelang stats`")
    if not (Path(folder) / STATS_FILE).is_file():
        raise StatsError(f"no {STATS_FILE} in {folder}: not a sidecar written by `mergelang stats`")
    try:
        info = read_json(Path(folder) / STATS_FILE, obj=True)
    except (OSError, ValueError) as exc:
        raise StatsError(f"cannot read {Path(folder) / STATS_FILE}: {reason(exc)}") from None
    if info.get("kind") != "correlation":
        raise StatsError(f"{folder} holds `{info.get('kind')}` statistics, not `correlation`")
    if not isinstance(info.get("groups"), dict) or not isinstance(info.get("sites"), list):
        raise StatsError(f"{Path(folder) / STATS_FILE} lacks its `groups` / `sites`")
    return info


def check_stats(info: Mapping[str, Any], shapes: Mapping[str, Any], spec: AlignSpec) -> list[str]:
    """Problems of a correlation sidecar (its JSON and tensor shapes) against `spec`."""
    problems = []
    groups = info["groups"]
    for g in spec.groups:
        got = groups.get(g.name)
        if not isinstance(got, dict):
            problems.append(f"it has no statistics for the group `{g.name}` (its groups: "
                            f"{', '.join(list(groups)[:4]) or 'none'})")
        elif got.get("size") != g.size:
            problems.append(f"its group `{g.name}` has size {got.get('size')!r}, the model's {g.size}")
    extra = sorted(set(groups) - {g.name for g in spec.groups})
    if extra:
        problems.append(f"it has groups the model's spec lacks: {', '.join(extra[:4])}")
    by_key = sites(info)
    for g in spec.groups:  # each group's sites: a list of keys of the `sites` entries
        keys = groups.get(g.name, {}).get("sites", []) if isinstance(groups.get(g.name), dict) else []
        bad = [k for k in keys if not isinstance(k, str) or k not in by_key] if isinstance(keys, list) else [keys]
        if bad:
            problems.append(f"its group `{g.name}` names sites it does not describe: {bad[0]!r}")
    for s in by_key.values():
        if not isinstance(s.get("weight"), str) or type(s.get("axis")) is not int:
            problems.append(f"site `{s.get('key')}` lacks a weight name or an integer axis")
    members = spec.by_tensor()
    for s in by_key.values():
        L = s.get("features")
        for part, shape in (("corr", [L, L]), ("mean_a", [L]), ("std_b", [L])):
            have = shapes.get(f"{s.get('key')}.{part}")
            if have is None or list(have) != shape:
                problems.append(f"tensor `{s.get('key')}.{part}` is "
                                f"{'missing' if have is None else list(have)}, expected {shape}")
        if s.get("weight") not in members:
            problems.append(f"site `{s.get('key')}`: `{s.get('weight')}` is in no group of the spec")
        elif s.get("axis") not in {m.axis for _, m in members[s["weight"]]}:
            problems.append(f"site `{s.get('key')}`: no group permutes axis {s.get('axis')!r} of `{s['weight']}`")
    return problems


def sites(info: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {s.get("key"): s for s in info["sites"] if isinstance(s, dict)}


def site_cost(g: Group, corr: torch.Tensor, weight: str, axis: int, members_of: Mapping,
              perms: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The similarity (n x n) of `g`'s units from one site's correlation (rows: A's features,
    columns: B's), B's side permuted by the other groups on the same axis."""
    on_axis = [(gg, m) for gg, m in members_of.get(weight, ()) if m.axis == axis]
    own = [m for gg, m in on_axis if gg.name == g.name]
    if not own:
        return None
    others = [(gg, replace(m, axis=0)) for gg, m in on_axis if gg.name != g.name]
    c = permute_tensor(corr.T, others, perms).T  # columns: B's features with the others applied
    n = g.size
    cost = None
    for m in own:
        seg = slice(m.start, m.start + m.repeat * n * m.block)
        s = c[seg, seg].reshape(m.repeat, n, m.block, m.repeat, n, m.block)
        part = s.diagonal(dim1=0, dim2=3).diagonal(dim1=1, dim2=3).sum((-1, -2))  # (n, n)
        cost = part if cost is None else cost + part
    return cost


def activation_matching(corrs: Mapping[str, torch.Tensor], info: Mapping[str, Any], spec: AlignSpec,
                        seed: int = 0, method: str = "weight_matching", max_sweeps: int = MAX_SWEEPS,
                        device: str | torch.device | None = None) -> AlignResult:
    """Permutations of B's groups maximising the summed activation correlation with A (module
    docstring). `corrs`: {site key: corr (L x L)} for the sites the groups use."""
    import torch

    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    C = {k: v.to(dev, torch.float64) for k, v in corrs.items()}
    by_key = sites(info)
    members_of = spec.by_tensor()

    def cost_of(g: Group, perms: dict[str, torch.Tensor]) -> torch.Tensor:
        if has_blocks(g):
            return block_cost(g, C, info, by_key)
        total = torch.zeros(g.size, g.size, dtype=torch.float64, device=dev)
        for key in info["groups"][g.name].get("sites", []):
            s = by_key[key]
            part = site_cost(g, C[key], s["weight"], int(s["axis"]), members_of, perms)
            if part is not None:
                total = total + part
        return total

    perms, sweeps, converged, history = descend(spec, cost_of, seed, method, max_sweeps, dev)
    return AlignResult({k: v.cpu() for k, v in perms.items()}, sweeps, converged, history,
                       time.perf_counter() - t0)


def has_blocks(g: Group) -> bool:
    return any(m.block > 1 for m in g.members)


def block_cost(g: Group, C: Mapping[str, torch.Tensor], info: Mapping[str, Any],
               by_key: Mapping[str, Mapping[str, Any]]) -> torch.Tensor:
    """The similarity for a group of whole blocks (heads): one that does not depend on how the
    positions inside a block are ordered (the groups of dims inside every head permute them):
    the sum over block i's positions of their best correlation with any position of block j."""
    import torch

    total = torch.zeros(g.size, g.size, dtype=torch.float64, device=next(iter(C.values())).device)
    for key in info["groups"][g.name].get("sites", []):
        s = by_key[key]
        for m in g.members:
            if m.tensor != s["weight"] or m.axis != int(s["axis"]):
                continue
            n, seg = g.size, slice(m.start, m.start + m.repeat * g.size * m.block)
            x = C[key][seg, seg].reshape(m.repeat, n, m.block, m.repeat, n, m.block)
            x = x.diagonal(dim1=0, dim2=3)  # (n, block, n, block, repeat)
            total = total + x.amax(dim=3).sum((1, 3))
    return total


def used_keys(info: Mapping[str, Any]) -> list[str]:
    keys: list[str] = []
    for g in info["groups"].values():
        keys += [k for k in g.get("sites", []) if k not in keys]
    return keys
