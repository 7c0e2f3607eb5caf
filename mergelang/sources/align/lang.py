"""The `align(model, to = ref, method = "weight_matching", seed = 0)` intrinsic.

Evaluating `align(...)` registers a derived model, named after the call (e.g.
`align(other, to=base)`), in the compilation's model table: an `AlignedSource` that reads `other`
and permutes each tensor on load. The result is a `ModelV` for that name, so an aligned model is
usable wherever a model is (in lists, functions, as the input of another `align`). Everything
checked here comes from config.json and safetensors headers; the permutations themselves are
solved in the model-level stage before streaming (`AlignedSource.prepare`, called by `execute`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from mergelang.diagnostics import CompileError, Span
from mergelang.lang.intrinsics.registry import Elab, intrinsic
from mergelang.lang.values import Const, ListV, ModelV, Value
from mergelang.sources.align.solve import METHODS
from mergelang.sources.align.source import AlignedSource
from mergelang.sources.align.spec import SpecError, custom_spec, spec_for

DOC = ("the model permuted (hidden units, heads) to match `to`, for merging: "
       "method = \"weight_matching\" | \"ot\"; permutations are applied on load; "
       "method = \"ot\" with reg > 0: soft transport maps (OT fusion) instead of permutations")


def derived_name(model: str, to: str, method: str, seed: int, groups: tuple[str, ...] = (),
                 reg: float = 0.0, stats: str | None = None) -> str:
    extra = "" if stats is None else f", by=activations, stats={stats}"
    extra += "" if method == "weight_matching" else f", method={method}"
    extra += "" if seed == 0 else f", seed={seed}"
    extra += "" if reg == 0 else f", reg={reg:g}"
    if groups:
        digest = hashlib.sha1("\n".join(groups).encode()).hexdigest()[:8]
        extra += f", groups={len(groups)}#{digest}"
    return f"align({model}, to={to}{extra})"


@intrinsic("align", "model", "to", ("method", "weight_matching"), ("seed", 0), ("groups", None), ("reg", 0),
           ("by", "weights"), ("stats", None), doc=DOC)
def _align(el: Elab, a: dict[str, Value], span: Span) -> Value:
    from mergelang.lang.values import Poisoned

    model, to, method, seed = a["model"], a["to"], a["method"], a["seed"]
    for what, v in (("model", model), ("to", to)):
        if not isinstance(v, ModelV):
            raise el.error("E601", f"align's `{what}` must be a model, got {v.describe()}", span,
                           "align works on whole checkpoints, e.g. align(other, to = base)")
    if not (isinstance(method, Const) and method.value in METHODS):
        got = method.value if isinstance(method, Const) else method.describe()
        raise el.error("E602", f"unknown alignment method {got!r}", span,
                       "method = " + " | ".join(f'"{m}"' for m in METHODS))
    if not (isinstance(seed, Const) and isinstance(seed.value, int) and not isinstance(seed.value, bool)):
        raise el.error("E201", f"align's `seed` must be an integer, got {seed.describe()}", span)
    reg = _reg(el, a["reg"], method.value, span)
    groups = _groups(el, a["groups"], span)
    stats = by_activations(el, a["by"], a["stats"], reg, span)
    name = derived_name(model.name, to.name, method.value, seed.value, groups, reg,  # type: ignore[union-attr]
                        stats.name if stats is not None else None)
    if name in el.models:
        return ModelV(name, span)
    if not el.tensor:
        raise el.error("E601", "align(...) makes a model, so it can only be used in merge rules "
                       "and functions, not in a param", span)
    src, ref = el.models.get(model.name), el.models.get(to.name)  # type: ignore[union-attr]
    side = el.models.get(stats.name) if stats is not None else None
    if src is None or ref is None or (stats is not None and side is None):
        raise Poisoned()  # a model failed to open: already reported
    try:
        made = _derive(el, name, src, ref, model, to, method.value, seed.value, groups, span, reg)  # type: ignore[union-attr]
        if side is not None:
            made.stats, made.stats_info = side, stats_info(el, side, made.spec, stats, span)
            swapped(el, made.stats_info, src, ref, stats, span)
        el.models[name] = made
    except CompileError:
        el.models[name] = None  # reported once (here); later uses of this model are skipped
        raise
    return ModelV(name, span)


def _derive(el: Elab, name: str, src: Any, ref: Any, model: ModelV, to: ModelV, method: str, seed: int,
            groups: tuple[str, ...], span: Span, reg: float = 0.0) -> AlignedSource:
    shapes = {k: v.shape for k, v in src.tensors().items()}
    ref_shapes = {k: v.shape for k, v in ref.tensors().items()}
    try:
        spec = custom_spec(groups, shapes) if groups else spec_for(src.config() or ref.config(), shapes)
    except SpecError as exc:
        if groups:
            raise el.error("E605", f"invalid permutation group: {exc}", span,
                           'e.g. groups = ["mlp: model.layers.{i}.mlp.up_proj.weight@0 '
                           'model.layers.{i}.mlp.down_proj.weight@1"]') from None
        raise el.error("E603", f"cannot align `{model.name}`: {exc}", span,  # type: ignore[union-attr]
                       "built-in specs: Llama, Mistral, Qwen2/3 and GPT-2 (from config.json)") from None
    problems = spec.check(shapes)
    if problems:
        raise el.error("E603", f"cannot align `{model.name}`: the {spec.arch} spec does not fit its "
                       f"tensors: {problems[0]}", span, "is config.json the model's own?")
    for t in spec.tensors():
        if ref_shapes.get(t) != shapes[t]:
            got = "missing" if t not in ref_shapes else f"shape {list(ref_shapes[t])}"
            raise el.error("E604", f"cannot align `{model.name}` to `{to.name}`: tensor `{t}` has shape "  # type: ignore[union-attr]
                           f"{list(shapes[t])} in `{model.name}` but is {got} in `{to.name}`", span,  # type: ignore[union-attr]
                           "alignment needs two models of the same architecture and size")
    return AlignedSource(name, src, ref, spec, method, seed, reg)


def _reg(el: Elab, v: Value, method: str, span: Span) -> float:
    """`reg`: the entropic regularisation of soft OT (0 = hard permutations)."""
    ok = isinstance(v, Const) and isinstance(v.value, (int, float)) and not isinstance(v.value, bool)
    if not ok or not (v.value >= 0 and v.value < float("inf")):  # type: ignore[union-attr]
        got = v.value if isinstance(v, Const) else v.describe()
        raise el.error("E606", f"align's `reg` must be a finite number >= 0, got {got!r}", span,
                       "reg = 0 gives hard permutations; e.g. reg = 0.05 for a soft OT alignment")
    if v.value > 0 and method != "ot":  # type: ignore[union-attr]
        raise el.error("E606", f"`reg = {v.value}` (soft alignment) needs method = \"ot\", not {method!r}", span,  # type: ignore[union-attr]
                       'align(model, to = ref, method = "ot", reg = 0.05)')
    return float(v.value)  # type: ignore[union-attr]


def _groups(el: Elab, v: Value, span: Span) -> tuple[str, ...]:
    """`groups = none` (the built-in spec), one group string, or a list of them."""
    if isinstance(v, Const) and v.value is None:
        return ()
    items = v.items if isinstance(v, ListV) else (v,)
    if not items or not all(isinstance(i, Const) and isinstance(i.value, str) for i in items):
        raise el.error("E605", f"`groups` must be a string or a list of strings, got {v.describe()}", span,
                       'e.g. groups = ["mlp: model.layers.{i}.mlp.up_proj.weight@0 ..."]')
    return tuple(i.value for i in items)  # type: ignore[union-attr]


def by_activations(el: Elab, by: Value, stats: Value, reg: float, span: Span) -> ModelV | None:
    """`by = "weights"` (default) or `"activations"` with `stats = SIDECAR` (a declared model):
    the sidecar model value, or None for weight matching (E967 for a bad combination)."""
    from mergelang.sources.align.activations import BY

    if not (isinstance(by, Const) and by.value in BY):
        got = by.value if isinstance(by, Const) else by.describe()
        raise el.error("E967", f"align's `by` must be \"weights\" or \"activations\", got {got!r}", span,
                       'align(b, to = a, by = "activations", stats = c)')
    none = isinstance(stats, Const) and stats.value is None
    if by.value == "weights":
        if not none:
            raise el.error("E967", "align's `stats` is read only with by = \"activations\"", span,
                           'align(b, to = a, by = "activations", stats = c)')
        return None
    if none or not isinstance(stats, ModelV):
        got = "missing" if none else stats.describe()
        raise el.error("E967", f"align(by = \"activations\") needs `stats` = the correlation sidecar "
                       f"(a declared model), got {got}", span,
                       'model c = "corr/"  (mergelang stats A B --kind correlation -o corr/), then '
                       'align(b, to = a, by = "activations", stats = c)')
    if reg:
        raise el.error("E967", "soft alignment (reg > 0) is not available with by = \"activations\"",
                       span, "use reg = 0 (hard permutations)")
    return stats


def stats_info(el: Elab, side: Any, spec: Any, stats: ModelV, span: Span) -> dict:
    """The correlation sidecar's JSON, checked against the spec (E968: file:line:col of the call)."""
    from mergelang.sources.align.activations import StatsError, check_stats, read_info

    try:
        info = read_info(side.folder)
    except StatsError as exc:
        raise el.error("E968", f"align's stats `{stats.name}`: {exc}", span,
                       "mergelang stats A B --data DATA --kind correlation -o C") from None
    shapes = {k: v.shape for k, v in side.tensors().items()}
    problems = check_stats(info, shapes, spec)
    if problems:
        raise el.error("E968", f"align's stats `{stats.name}` do not fit the {spec.arch} groups: "
                       f"{problems[0]}", span, "compute them with the same groups (config.json / "
                       "--group) on these two models: mergelang stats A B --kind correlation")
    return info


def swapped(el: Elab, info: dict, src: Any, ref: Any, stats: ModelV, span: Span) -> None:
    """E968 when the sidecar was computed as `stats B A` (its first model must be `to`)."""
    from pathlib import Path

    models = info.get("models")
    if not (isinstance(models, list) and len(models) == 2 and src.folder and ref.folder):
        return
    got = [Path(str(m)).resolve() for m in models]
    want = [Path(ref.folder).resolve(), Path(src.folder).resolve()]
    if got[0] != got[1] and got == want[::-1]:
        raise el.error("E968", f"align's stats `{stats.name}` were computed as `stats {models[0]} "
                       f"{models[1]}`: the first model must be the reference `to`", span,
                       "mergelang stats TO MODEL --kind correlation (A = to, B = the model aligned)")
    if got != want:  # same shapes, other folders: maybe moved copies, maybe other models
        from mergelang.diagnostics import warning

        el.diags.add(warning("W148", f"align's stats `{stats.name}` were computed for "
                             f"{models[0]} and {models[1]}, not for the models aligned here "
                             f"({want[0]} and {want[1]})", span,
                             "recompute them: mergelang stats TO MODEL --kind correlation (or "
                             "ignore this if the folders were moved)"))
