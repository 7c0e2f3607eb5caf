"""The aggregates of an inspect report (the whole model, per layer, family and expert) as a
ledger: each tensor's sums (and each expert slice's of a fused [E, ...] tensor) are one row of
flat arrays, in the order they come; the groups are summed once at the end, each group's rows
in that order (`np.bincount`: one sequential sum per group), so every float is the one adding
the tensors' Groups one after the other gives, with no Python object per tensor and group."""

from __future__ import annotations

from typing import Any

import numpy as np

from mergelang.tools.inspect_stats import FRACTIONS, Group, ModelSums, PairSums


class Totals:
    """Rows: tensors (in total, their layer, family and expert) and expert slices (in their
    expert only)."""

    def __init__(self, n: int):
        self.n = n
        self.npairs = n * (n - 1) // 2
        self.blocks: list[tuple[np.ndarray, ...]] = []  # numel, mstats, energy, pstats, keys
        self.keys: dict[str, dict[Any, int]] = {"layers": {}, "families": {}, "experts": {}}
        self.eff: list[tuple[int, list[list[float]]]] = []  # (row, per model) with --spectrum
        self.rows = 0

    def _key(self, kind: str, k: Any) -> int:
        if k is None:
            return -1
        return self.keys[kind].setdefault(k, len(self.keys[kind]))

    def add_rows(self, numel: np.ndarray, mstats: np.ndarray, energy: np.ndarray, pstats: np.ndarray,
                 wheres: list[tuple[Any, str, Any]], in_total: bool = True) -> None:
        """Rows of batch_sums' arrays (inspect_small.py), their (layer, family, expert); not
        `in_total`: expert slices, counted in their expert only."""
        keys = np.array([(0 if in_total else -1,
                          self._key("layers", w[0]) if in_total else -1,
                          self._key("families", w[1]) if in_total else -1,
                          self._key("experts", w[2])) for w in wheres], np.int64).reshape(-1, 4)
        self.blocks.append((numel, mstats, energy, pstats, keys))
        self.rows += len(wheres)

    def add(self, g: Group, where: tuple[Any, str, Any], per_expert: list[Group]) -> None:
        """A tensor's Group (after its expert slices' Groups, if fused)."""
        for e, pe in enumerate(per_expert):
            self._add_group(pe, (None, "", e), False)
        self._add_group(g, where, True)

    def _add_group(self, g: Group, where: tuple[Any, str, Any], in_total: bool) -> None:
        ms = np.array([[m.ss, m.base_ss, m.max_abs, m.zeros] for m in g.models], np.float64)
        en = np.array([m.energy for m in g.models], np.float64).reshape(1, self.n, len(FRACTIONS))
        ps = np.array([[p.dot, p.agree, p.both] for p in g.pairs.values()], np.float64)
        if any(m.eff_ranks for m in g.models):
            self.eff.append((self.rows, [list(m.eff_ranks) for m in g.models]))
        numel = g.models[0].numel if g.models else 0
        self.add_rows(np.array([numel], np.int64), ms.reshape(1, self.n, 4), en,
                      ps.reshape(1, self.npairs, 3), [where], in_total)

    def groups(self) -> tuple[Group, dict[str, dict[Any, Group]]]:
        """The total and the Groups of each kind (key -> Group), summed row by row in order."""
        cat = [np.concatenate(parts) if parts else None for parts in zip(*self.blocks)]
        out: dict[str, dict[Any, Group]] = {}
        total = Group.empty(self.n)
        for col, (kind, names) in enumerate([("total", {0: 0}), *self.keys.items()]):
            sums = _sum_rows(cat, col, len(names), self.n, self.npairs) if cat else None
            gs = {k: _group(sums, i, self.n) if sums else Group.empty(self.n) for k, i in names.items()}
            if kind == "total":
                total = gs[0]
            else:
                out[kind] = gs
        if self.eff:
            self._add_ranks(cat[4], total, out)
        return total, out

    def _add_ranks(self, keys: np.ndarray, total: Group, out: dict[str, dict[Any, Group]]) -> None:
        """--spectrum: the effective ranks of each row's tensor into its groups, in row order."""
        names = {kind: list(self.keys[kind]) for kind in out}
        for row, per_model in self.eff:
            for col, kind in ((0, None), (1, "layers"), (2, "families"), (3, "experts")):
                key = int(keys[row, col])
                if key >= 0:
                    g = total if kind is None else out[kind][names[kind][key]]
                    for m, ranks in zip(g.models, per_model):
                        m.eff_ranks += ranks

    def to_json(self, models: list[str]) -> dict[str, Any]:
        total, g = self.groups()
        return {"total": total.to_json(models),
                "layers": {str(k): g["layers"][k].to_json(models) for k in sorted(g["layers"])},
                "families": {k: v.to_json(models) for k, v in g["families"].items()},
                "experts": {str(k): g["experts"][k].to_json(models) for k in sorted(g["experts"])}}


def _sum_rows(cat: list[np.ndarray], col: int, ng: int, n: int, npairs: int) -> dict[str, Any]:
    """Per group (key column `col`, rows with key -1 left out): tensors, numel, the sums of
    ss, base_ss, energies, dots, counts (bincount: each group's rows added in order, from 0.0),
    and the max of max |τ| (from 0.0, NaN never taken: `if o > max` as ModelSums.add)."""
    numel, mstats, energy, pstats, keys = cat
    sel = keys[:, col] >= 0
    k = keys[sel, col]

    def add(v: np.ndarray) -> np.ndarray:
        return np.bincount(k, weights=v[sel], minlength=ng)

    def count(v: np.ndarray) -> list[int]:
        out = np.zeros(ng, np.int64)
        np.add.at(out, k, v[sel].astype(np.int64))
        return out.tolist()

    mx = np.zeros((ng, n), np.float64)
    np.fmax.at(mx, k, mstats[sel, :, 2])
    return {"tensors": count(np.ones(len(keys), np.int64)), "numel": count(numel),
            "ss": [add(mstats[:, j, 0]) for j in range(n)], "bss": [add(mstats[:, j, 1]) for j in range(n)],
            "zeros": [count(mstats[:, j, 3]) for j in range(n)], "mx": mx,
            "energy": [[add(energy[:, j, f]) for f in range(energy.shape[2])] for j in range(n)],
            "dot": [add(pstats[:, p, 0]) for p in range(npairs)],
            "agree": [count(pstats[:, p, 1]) for p in range(npairs)],
            "both": [count(pstats[:, p, 2]) for p in range(npairs)]}


def _group(s: dict[str, Any], i: int, n: int) -> Group:
    g = Group([ModelSums(numel=s["numel"][i], ss=float(s["ss"][j][i]), base_ss=float(s["bss"][j][i]),
                         max_abs=float(s["mx"][i, j]), zeros=s["zeros"][j][i],
                         energy=[float(e[i]) for e in s["energy"][j]]) for j in range(n)],
              {(a, b): PairSums() for a in range(n) for b in range(a + 1, n)})
    for p, pair in enumerate(g.pairs.values()):
        pair.dot, pair.agree, pair.both = float(s["dot"][p][i]), s["agree"][p][i], s["both"][p][i]
    g.tensors = s["tensors"][i]
    return g
