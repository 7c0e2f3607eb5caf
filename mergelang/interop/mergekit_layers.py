"""Layer layout of an imported mergekit config, checked against the models (headers only), and
the pruning of rules against the reference checkpoint.

- `check_ranges`: every `layer_range` lies inside its model (mergekit fails on a range past the
  last layer: E708), counted from the local model's tensor names or config.json.
- `relayer`: slices that cover fewer layers than the models (`[0, 8]` of a 32-layer model) or
  take other layers (`[4, 8]`, the same layers twice, different layers of each model): mergekit
  writes the layers its slices name, renumbered from 0, so every merged model becomes
  `stack_layers([layer_range(M, A, B), ...])` before the rules.
- `check_architectures`: local models whose config.json name different `architectures` are
  refused (E709) unless `allow_crimes` (mergekit's `--allow-crimes`); then the recipe gets
  `option allow_crimes = true`.
"""

from __future__ import annotations

from pathlib import Path

from mergelang.interop.mergekit_checks import architectures, layer_count
from mergelang.interop.mergekit_config import ConfigReader, Slice, Source


class LayerPlanner(ConfigReader):
    allow_crimes: bool = False

    def counts(self) -> dict[str, int | None]:
        """Recipe model name -> its layer count (None: not local, or not readable)."""
        cache = getattr(self, "_counts", None)
        if cache is None:
            cache = {}
            for ref, name in self.models.items():
                path = self.local_paths.get(ref)
                if name not in cache or cache[name] is None:
                    cache[name] = layer_count(path, self.layer_prefix) if path is not None else None
            self._counts = cache
        return cache

    def check_ranges(self, slices: list[Slice]) -> None:
        counts = self.counts()
        for k, sl in enumerate(slices):
            for j, src in enumerate(sl.sources):
                n = counts.get(src.model)
                if src.layer_range is not None and n is not None and src.layer_range[1] > n:
                    a, b = src.layer_range
                    self.err("E708", f"slices[{k}].sources[{j}]: layer_range [{a}, {b}] runs past "
                             f"the last layer of `{src.model}`, which has {n} layers (0..{n - 1})",
                             "mergekit refuses it too: give a range [start, end) with end <= "
                             f"{n}")

    def relayer(self, slices: list[Slice], ref: str) -> tuple[list[Slice], str]:
        """mergekit writes the layers its slices name, renumbered from 0 in slice order. When
        every slice takes layer ranges of the same length from the same models and that is not
        simply all of their layers in order, each model is first restacked to its ranges
        (`stack_layers([layer_range(m, a, b), ...])`) and the slices renumbered: `[0, 8]` of a
        32-layer model keeps 8 layers, `[4, 8]` becomes layers 0..3, `a[0, 2]` with `b[1, 3]`
        merges a's layer 0 with b's layer 1."""
        if not slices or any(src.layer_range is None for sl in slices for src in sl.sources):
            return slices, ref
        names = list(dict.fromkeys(src.model for sl in slices for src in sl.sources))
        per: dict[str, list[tuple[int, int]]] = {n: [] for n in names}
        for sl in slices:
            if sorted(src.model for src in sl.sources) != sorted(names) or \
                    len({r[1] - r[0] for r in (src.layer_range for src in sl.sources)}) != 1:  # type: ignore[index]
                return slices, ref  # check_layout decides
            for src in sl.sources:
                per[src.model].append(src.layer_range)  # type: ignore[arg-type]
        if ref not in per:
            per[ref] = per[names[0]]  # a base_model outside the slices: the first model's layers
        counts = self.counts()

        def whole(n: str) -> bool:
            rs = per[n]
            return all(r[0] == (rs[k - 1][1] if k else 0) for k, r in enumerate(rs)) and \
                counts.get(n) == rs[-1][1]

        if all(whole(n) for n in per):
            return slices, ref
        have = sorted({str(counts.get(n)) for n in per if counts.get(n) is not None})
        self.model_lines.append(
            "# mergekit writes the layers the slices name, renumbered from 0 in slice order "
            "(the models have " + (" / ".join(have) + " layers)" if have else "a layer count not known here)"))
        renamed: dict[str, str] = {}
        taken = set(self.models.values())
        for n, rs in per.items():
            cut = f"{n}_layers"
            while cut in taken:
                cut += "_"
            taken.add(cut)
            renamed[n] = cut
            spans = ", ".join(f"layer_range({n}, {a}, {b})" for a, b in rs)
            self.model_lines.append(f"model {cut} = stack_layers([{spans}])")
        for r, n in list(self.models.items()):
            if n in renamed:
                self.models[r] = renamed[n]
        total = sum(b - a for a, b in per[names[0]])
        self._counts = {renamed.get(n, n): (total if n in renamed else c) for n, c in counts.items()}
        out, offset = [], 0
        for sl in slices:
            a, b = sl.sources[0].layer_range  # type: ignore[misc]
            out.append(Slice([Source(renamed[s.model], (offset, offset + b - a), s.params)
                              for s in sl.sources], sl.params))
            offset += b - a
        return out, renamed.get(ref, ref)

    def check_architectures(self) -> list[str]:
        """E709 for local models whose config.json name different architectures (unless
        allow_crimes: then the recipe's option lines)."""
        seen: dict[tuple[str, ...], str] = {}
        for ref, path in self.local_paths.items():
            arch = architectures(Path(path))
            if arch is not None:
                seen.setdefault(arch, ref)
        if len(seen) <= 1:
            return []
        kinds = "; ".join(f"`{r}`: {', '.join(a)}" for a, r in seen.items())
        if self.allow_crimes:
            return ["# the models name different architectures (import-mergekit --allow-crimes)",
                    "option allow_crimes = true"]
        self.err("E709", f"the models name different architectures in config.json ({kinds})",
                 "merging different architectures is refused, as mergekit does without "
                 "--allow-crimes; pass --allow-crimes to import it anyway")
        return []

    def prune(self, lines: list[str], ref: str) -> list[str]:
        """With the reference checkpoint at hand, drop rules that match none of its tensors
        (they could never apply) and comments left without rules."""
        refs = [k for k, v in self.models.items() if v == ref]
        path = self.local_paths.get(refs[0]) if refs else None
        if path is None:
            return lines
        from mergelang.lang.ast import compile_pattern, glob_to_regex
        from mergelang.io.checkpoint import CheckpointError
        from mergelang.io.locate import open_model

        try:
            src = open_model(ref, path)
        except (OSError, CheckpointError):
            return lines
        try:
            names = list(src.tensors())
        finally:
            src.close()
        rules = [line for line in lines if not line.startswith("#")]
        compiled = []
        for line in rules:
            head = line.split(" => ", 1)[0]
            pat = head.split(" if ", 1)[0].strip()
            regex = pat[3:-1] if pat.startswith('re"') else glob_to_regex(pat[1:-1])[0]
            compiled.append((compile_pattern(regex, "regex" if pat.startswith('re"') else "glob"),
                             " if " in head))
        used: set[int] = set()
        for n in names:  # first match wins; a guarded rule may let the tensor fall through
            for k, (rx, guarded) in enumerate(compiled):
                if rx.fullmatch(n):
                    used.add(k)
                    if not guarded:
                        break
        if not used:
            return lines
        kept = [line for line in lines if line.startswith("#") or rules.index(line) in used]
        return [line for i, line in enumerate(kept)
                if not (line.startswith("#") and (i + 1 == len(kept) or kept[i + 1].startswith("#")))]

