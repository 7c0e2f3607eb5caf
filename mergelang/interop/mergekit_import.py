"""Translate a mergekit YAML config into an equivalent, readable `.mrg` recipe.

mergekit semantics reproduced here (mergekit/config.py `evaluate_setting`, mergekit/plan.py):
- a parameter is looked up per model (the model's / slice source's `parameters`), then in the
  slice's `parameters`, then in the global `parameters`; a value that does not apply falls through;
- a parameter may be a list of `{filter, value}` conditions: the first whose `filter` is a
  substring of the tensor name (or is absent / "*") applies; each parameter has its own list;
- a list of numbers is a *gradient*: spread over the layers of the slice, t = idx / (n - 1)
  (t = 1 for a one-layer slice), linearly interpolated; tensors before the layers (embeddings)
  use t = 0 and tensors after them (final norm, lm_head) t = 1;
- `dtype` is mergekit's compute dtype and `out_dtype` the output's; mergelang computes in float32
  and writes `option dtype = out_dtype or dtype`.

Filters become rules with glob patterns (`"model.layers.{i}.*mlp*"`); a tensor name containing
several filters gets a rule of its own only when that changes a value. Gradients become `param`
lists used through the `gradient(values, t)` intrinsic, so they stay editable with `--set`.

What is not translated is reported (warnings W101-W103, W120; errors E701-E710), never dropped
silently. Reading and structure checks: mergekit_yaml.py, mergekit_checks.py; the layer layout
checked against the models: mergekit_layers.py.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from mergelang.diagnostics import error
from mergelang.interop.mergekit_evolve import is_evolve_config, translate_evolve
from mergelang.interop.mergekit_moe import is_moe_config, translate_moe
from mergelang.interop.mergekit_multi import translate_multi
from mergelang.interop.mergekit_yaml import load_yaml, read_config_text, short
from mergelang.interop.mergekit_checks import KNOWN_PARAMS, check_structure, finite
from mergelang.interop.mergekit_layers import LayerPlanner
from mergelang.interop.mergekit_config import (IMPORT_IGNORES_WEIGHTS, UNUSED_BY_METHOD, UNUSED_GLOBALS, as_numeric, IGNORED_PARAMS, MAX_FILTERS, METHODS, PER_MODEL_DEFAULTS, TAKES_BASE_KW,
                              PER_MODEL_METHOD_DEFAULTS,
                              TOP_KEYS, L1_RESCALE, Result, Slice, Source, conds, evaluate, fmt,
                              to_ident, is_gradient, layer_only, comment_text)


class Translator(LayerPlanner):
    """Parameters, expressions and rules on top of the config structure."""

    output_name: str | None = None  # a named block (one document of a mergekit-multi file)
    block_lines: list[str] = []
    option_lines: list[str] = []

    # ------------------------------------------------------------ parameters
    def lookup(self, name: str, src: Source | None, sl: Slice, matched: frozenset[str]) -> Any:
        chain = [sl.params, self.cfg.get("parameters") or {}]
        if src is not None:
            chain.insert(0, src.params)
        for d in chain:
            if name in d:
                v = evaluate(d[name], matched)
                if v is not None:
                    return v
        return None

    def value(self, v: Any, root: str, pname: str, t_expr: str) -> str:
        v = as_numeric(v)
        nums = v if is_gradient(v) else [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else []
        if any(finite(x) is None for x in nums):
            self.err("E705", f"parameter `{root}`: {short(v)} is not a finite number")
            return fmt(None)
        if is_gradient(v):
            if len(v) == 1:
                return fmt(v[0])
            return f"gradient({self.hoist(root, pname, v)}, {t_expr})"
        if isinstance(v, list):
            self.err("E705", f"parameter `{pname}`: a list of {short(v)} is not a gradient of numbers")
            return fmt(None)
        if not isinstance(v, (bool, int, float, str)):
            self.err("E705", f"parameter `{root}`: {short(v)} is not a number, bool, string or "
                     "gradient (a list of numbers)")
            return fmt(None)
        return fmt(v)

    def hoist(self, root: str, pname: str, values: list) -> str:
        key = (root, tuple(values))
        if key in self.hoisted:
            return self.hoisted[key]
        name = to_ident(pname)
        taken = set(self.hoisted.values()) | set(self.models.values())
        cand, k = name, 2
        while cand in taken:
            cand, k = f"{name}_{k}", k + 1
        self.hoisted[key] = cand
        self.param_lines.append(f"param {cand} = {fmt(values)}")
        return cand

    # ------------------------------------------------------------ expressions
    def call(self, method: str, sl: Slice, matched: frozenset[str], t_expr: str,
             filt: str) -> str:
        conv, weight_required = METHODS[method]
        base = self.models.get(self.cfg.get("base_model")) if self.cfg.get("base_model") else None
        suffix = f"_{filt}" if filt else ""
        kwargs: list[str] = []
        per_model_names: list[str] = []
        for src in sl.sources:
            per_model_names += [p for p in src.params if p not in per_model_names]
        if conv == "single":
            return self._call_single(sl, matched, t_expr, suffix)
        if conv == "pair":
            return self._call_pair(method, base, sl, matched, t_expr, suffix)
        members = [s for s in sl.sources if not (conv == "base_models" and s.model == base)]
        if method == "karcher" and base is not None and base not in [s.model for s in members]:
            # mergekit's karcher averages every input, base_model included
            members = members + [Source(base, sl.sources[0].layer_range, {})]
        if conv == "base_models" and base is None:
            self.err("E705", f"{method} needs `base_model`")
            return "none"
        if not members:
            self.err("E702", f"{method}: no models to merge")
            return "none"
        if method in IMPORT_IGNORES_WEIGHTS and "weight" in per_model_names:
            self.warn("W102", f"per-model `weight` has no effect with {method} (mergekit ignores it; "
                      "the recipe leaves it out)")
        for p in per_model_names:
            if p in IGNORED_PARAMS or (p == "weight" and method in IMPORT_IGNORES_WEIGHTS):
                continue
            if p in UNUSED_BY_METHOD.get(method, ()):
                self.warn("W102", f"per-model `{p}` has no effect with {method} (mergekit ignores "
                          "it too)")
                continue
            if p not in KNOWN_PARAMS[method]:
                continue  # dropped with W101 (unknown_params)
            vals = []
            for src in members:
                v = self.lookup(p, src, sl, matched)
                if v is None:
                    v = PER_MODEL_METHOD_DEFAULTS.get(method, {}).get(p, PER_MODEL_DEFAULTS.get(p))
                if v is None:
                    self.err("E705", f"model `{src.model}` has no `{p}`" + (
                        f" (mergekit requires one for {method})" if p == "weight" else
                        " while other models have one; give it for every model"))
                    return "none"
                vals.append(self.value(v, p, f"{p}_{src.model}{suffix}", t_expr))
            kw = "weights" if p == "weight" else p
            same = len(set(vals)) == 1 and p != "weight"
            kwargs.append(f"{kw} = {vals[0] if same else '[' + ', '.join(vals) + ']'}")
        if weight_required and "weight" not in per_model_names:
            g = self.lookup("weight", None, sl, matched)
            if g is None:
                self.err("E705", f"{method}: the models have no `weight` (mergekit requires one)")
        self._globals(method, sl, matched, t_expr, suffix, kwargs, skip=set(per_model_names))
        if conv == "models" and method in TAKES_BASE_KW and base is not None:
            kwargs.append(f"base = {base}")
        models = "[" + ", ".join(s.model for s in members) + "]"
        head = f"{method}({base}, {models}" if conv == "base_models" else f"{method}({models}"
        return head + "".join(", " + k for k in kwargs) + ")"

    def _call_single(self, sl: Slice, matched: frozenset[str], t_expr: str, suffix: str) -> str:
        """passthrough: the slice's one model, scaled when it has a `scale`."""
        if len(sl.sources) != 1:
            self.err("E702", f"passthrough takes exactly one model per slice, got {len(sl.sources)}")
            return "none"
        src = sl.sources[0]
        scale = self.lookup("scale", src, sl, matched)
        if scale is None:
            return src.model
        return f"passthrough({src.model}, scale = {self.value(scale, 'scale', 'scale' + suffix, t_expr)})"

    def _call_pair(self, method: str, base: str | None, sl: Slice, matched: frozenset[str],
                   t_expr: str, suffix: str) -> str:
        """slerp/nuslerp-like methods: from base_model (t = 0) to the one other model (t = 1)."""
        if base is None:
            self.err("E705", f"{method} needs `base_model`")
            return "none"
        others = [s for s in sl.sources if s.model != base]
        if len(sl.sources) == 2 and len(others) == 2:
            self.err("E702", f"{method}: base_model `{base}` is not one of the two models "
                     f"(`{others[0].model}`, `{others[1].model}`)", f"{method} interpolates "
                     "from base_model (t = 0) to the other model (t = 1): name one of the two "
                     "as base_model")
            return "none"
        if len(others) != 1 or len(sl.sources) > 2:
            self.err("E702", f"{method} merges exactly two models (base_model and one other), "
                     f"got {len(sl.sources)}")
            return "none"
        t = self.lookup("t", None, sl, matched)
        if t is None:
            self.err("E705", f"{method} needs parameter `t`")
            return "none"
        kwargs: list[str] = []
        self._globals(method, sl, matched, t_expr, suffix, kwargs, skip={"t"})
        return f"{method}({base}, {others[0].model}, t = {self.value(t, 't', 't' + suffix, t_expr)}" + \
            "".join(", " + k for k in kwargs) + ")"

    def _globals(self, method: str, sl: Slice, matched: frozenset[str], t_expr: str, suffix: str,
                 kwargs: list[str], skip: set[str]) -> None:
        names: list[str] = []
        for d in (sl.params, self.cfg.get("parameters") or {}):
            names += [n for n in d if n not in names]
        for n in names:
            if n in skip or n in IGNORED_PARAMS:
                continue
            if n in UNUSED_GLOBALS.get(method, ()) or (n == "weight" and method in IMPORT_IGNORES_WEIGHTS):
                self.warn("W102", f"`{n}` has no effect with {method} (mergekit ignores it; the recipe "
                          "leaves it out)")
                continue
            if n not in KNOWN_PARAMS[method]:
                continue  # dropped with W101 (unknown_params)
            v = self.lookup(n, None, sl, matched)
            if n == "rescale":
                v = self.rescale(method, v)
                if v is not None:
                    kwargs.append(f"rescale = {v}")
                continue
            if v is None:
                continue
            kw = "weights" if n == "weight" else n
            kwargs.append(f"{kw} = {self.value(v, n, n + suffix, t_expr)}")
        if method in L1_RESCALE and "rescale" not in names:
            kwargs.append('rescale = "l1"')  # mergekit's default for DARE and DELLA

    def rescale(self, method: str, v: Any) -> str | None:
        """mergekit's `rescale` (a bool): an L1-norm rescale of what sparsification kept."""
        if v is None:
            return None
        if not isinstance(v, bool):
            self.err("E705", f"parameter `rescale` must be true or false, got {short(v)}")
            return None
        if method in L1_RESCALE:
            return '"l1"' if v else "false"
        return '"l1"' if v else None  # ties, breadcrumbs: off by default

    def unknown_params(self, method: str, slices: list[Slice]) -> None:
        """W101 for each parameter the method does not read (mergekit ignores them): it is
        left out of the recipe."""
        import difflib

        scopes = [("parameters", self.cfg.get("parameters") or {})]
        for k, sl in enumerate(slices):
            scopes.append((f"slices[{k}].parameters", sl.params))
            scopes += [(f"the parameters of `{src.model}`", src.params) for src in sl.sources]
        known = KNOWN_PARAMS[method]
        for scope, params in scopes:
            for n in params:
                if n in known or n in IGNORED_PARAMS or n in UNUSED_GLOBALS.get(method, ()) or \
                        n in UNUSED_BY_METHOD.get(method, ()) or \
                        (n == "weight" and method in IMPORT_IGNORES_WEIGHTS):
                    continue
                close = difflib.get_close_matches(str(n), known, 1)
                self.warn("W101", f"{scope}: `{n}` is not a parameter of {method}: left out, as "
                          "mergekit ignores it" + (f" (did you mean `{close[0]}`?)" if close else "")
                          + f"; {method} takes " + (", ".join(known) or "no parameters"))

    # ------------------------------------------------------------ rules
    def filters(self, slices: list[Slice]) -> list[str]:
        out: list[str] = []
        settings = list((self.cfg.get("parameters") or {}).values())
        for sl in slices:
            settings += list(sl.params.values())
            for src in sl.sources:
                settings += list(src.params.values())
        for s in settings:
            for f, _ in conds(s):
                if f is not None and not f.isprintable():  # no tensor name holds a newline
                    self.warn("W101", f"filter {short(f)} holds characters no tensor name has "
                              "(a line break, a control character): it can never match and is "
                              "left out")
                elif f is not None and f not in out:
                    out.append(f)
        return out

    def region_rules(self, method: str, sl: Slice, filters: list[str], t_expr: str
                     ) -> list[tuple[frozenset[str], str]]:
        """(filter set, expression) rules, most specific first; a set of several filters gets
        a rule only when its values differ from what the simpler rules give."""
        idx = {f: i for i, f in enumerate(filters)}

        def closure(s: frozenset[str]) -> frozenset[str]:
            return s | {f for f in filters if any(f in g for g in s)}

        subsets = sorted({closure(frozenset(c)) for r in range(len(filters) + 1)
                          for c in itertools.combinations(filters, r)},
                         key=lambda s: (len(s), sorted(idx[f] for f in s)))
        emitted: list[tuple[frozenset[str], str]] = []
        for s in subsets:
            filt = "_".join(sorted(s, key=idx.__getitem__))
            expr = self.call(method, sl, s, t_expr, to_ident(filt) if filt else "")
            if s:
                cands = [e for e in emitted if e[0] <= s]
                best = max(cands, key=lambda e: (len(e[0]), [-idx[f] for f in sorted(
                    e[0], key=idx.__getitem__)]))
                if best[1] == expr:
                    continue
            emitted.append((s, expr))
        return sorted(emitted, key=lambda e: (-len(e[0]), sorted(idx[f] for f in e[0])))

    def pattern(self, required: list[str], layer: bool) -> str:
        special = any(ch in f for f in required for ch in "*?{}\"\\")
        if layer and len(required) <= 1 and not special:
            return f'"{self.layer_prefix}.{{i}}.*' + (f"{required[0]}*" if required else "") + '"'
        if not layer and len(required) <= 1 and not special:
            return f'"*{required[0]}*"' if required else '"*"'
        # "contains every filter", in any order, without lookaheads (patterns run on RE2): one
        # alternative per order (filters are few: mergekit configs name one to three)
        orders = itertools.permutations([re.escape(f).replace('"', '\\"') for f in required])
        body = "|".join(".*" + ".*".join(o) + ".*" for o in orders)
        prefix = re.escape(self.layer_prefix) + r"\.(?P<i>\d+)\." if layer else ""
        return f're"{prefix}(?:{body})"'

    # ------------------------------------------------------------ driver
    def translate(self) -> Result:
        cfg = self.cfg
        for key in cfg:
            if key not in TOP_KEYS:
                self.warn("W101", f"`{key}` is not translated (unknown key)")
        method = cfg.get("merge_method")
        if method not in METHODS:
            self.err("E703", f"unknown merge_method {short(method)}",
                     "supported: " + ", ".join(sorted(METHODS)))
            return Result("", self.diags)
        base_ref = cfg.get("base_model")
        if base_ref is not None:
            self.model(base_ref, "base_model", base=True)
        slices = self.slices()
        self.option_lines = self.tokenizer_options()
        for scope, params in [("parameters", cfg.get("parameters") or {})] + \
                [(f"slices[{k}].parameters", s.params) for k, s in enumerate(slices)]:
            for n in params:
                if n in IGNORED_PARAMS:
                    self.warn("W102", f"{scope}.{n} has no effect in mergelang: {IGNORED_PARAMS[n]}")
        self.unknown_params(method, slices)
        self.check_ranges(slices)
        self.option_lines += self.check_architectures()
        if any(d.is_error for d in self.diags) or not slices:
            return Result("", self.diags)
        ref = self.models.get(base_ref) if base_ref else slices[0].sources[0].model
        if method == "passthrough" and not self._in_order(slices) and \
                all(len(s.sources) == 1 for s in slices):
            slices = self.stack(slices)
            ref = self.models["<stacked>"]
        if "<stacked>" not in self.models:
            slices, ref = self.relayer(slices, ref)
        self.check_layout(slices, method)
        if any(d.is_error for d in self.diags):
            return Result("", self.diags)
        filters = self.filters(slices)
        if len(filters) > MAX_FILTERS:
            self.err("E704", f"{len(filters)} different filters; at most {MAX_FILTERS} are supported")
            return Result("", self.diags)
        rules = self.prune(self.rules(method, slices, filters, ref), ref)
        if any(d.is_error for d in self.diags):
            return Result("", self.diags)
        return Result(self.render(method, rules, ref), self.diags)

    def rules(self, method: str, slices: list[Slice], filters: list[str], ref: str) -> list[str]:
        layer_blocks: list[tuple[str | None, list]] = []
        for sl in slices:
            lr = sl.sources[0].layer_range
            if lr is None:
                t_expr, guard = f"i / (num_layers({ref}) - 1)", None
            else:
                a, b = lr
                n = b - a
                t_expr = "1" if n == 1 else (f"i / {n - 1}" if a == 0 else f"(i - {a}) / {n - 1}")
                guard = None if len(slices) == 1 and a == 0 else (
                    f"i == {a}" if n == 1 else f"i >= {a} and i < {b}")
            layer_blocks.append((guard, self.region_rules(method, sl, filters, t_expr)))
        outer = [f for f in filters if not layer_only(f)]
        # mergekit plans the tensors outside the layer stack (embeddings, final norm, lm_head)
        # with t = 0: their gradients take their first value
        pre = self.region_rules(method, slices[0], outer, "0")
        post = self.region_rules(method, slices[-1], outer, "0")
        lines: list[str] = []

        def grads(rules: list) -> bool:
            return any("gradient(" in e for _, e in rules)

        at0 = ": gradients at t = 0, their first value (as mergekit)"
        if pre == post:
            nonlayer = [("# embeddings, final norm and lm_head" + (at0 if grads(post) else ""), None, post)]
        else:
            nonlayer = [("# tensors before the layers (embeddings), first slice" + (at0 if grads(pre) else ""),
                         "embed", pre),
                        ("# tensors after the layers (final norm, lm_head), last slice"
                         + (at0 if grads(post) else ""), None, post)]
        if pre == post and all(rules == post for _, rules in layer_blocks):
            return [self._rule(s, e, None, False, None) for s, e in post]
        for k, (guard, rules) in enumerate(layer_blocks):
            lr = slices[k].sources[0].layer_range
            if lr is None:
                what, run = "all layers", " from t = 0 at layer 0 to t = 1 at the last layer"
            elif lr[1] - lr[0] == 1:
                what, run = f"layer {lr[0]}", " at t = 1 (a one-layer slice, as mergekit)"
            else:
                what, run = (f"layers {lr[0]}..{lr[1] - 1}",
                             f" from t = 0 at layer {lr[0]} to t = 1 at layer {lr[1] - 1}")
            lines.append(f"# {what}" + (": gradients run" + run if grads(rules) else ""))
            lines += [self._rule(s, e, guard, True, None) for s, e in rules]
        for comment, marker, rules in nonlayer:
            lines.append(comment)
            lines += [self._rule(s, e, None, False, marker) for s, e in rules]
        return lines

    def _rule(self, s: frozenset[str], expr: str, guard: str | None, layer: bool,
              marker: str | None) -> str:
        required = ([marker] if marker else []) + sorted(s, key=lambda f: (-len(f), f))
        pat = self.pattern(required, layer)
        return pat + (f" if {guard}" if guard else "") + " => " + expr

    def render(self, method: str, rules: list[str], ref: str) -> str:
        src = f" {comment_text(self.config_path.name)}" if self.config_path else ""
        out = [f"# Translated from the mergekit config{src} by `mergelang import-mergekit`.",
               f"# merge_method: {method}. Parameters follow mergekit: per-model values, then global",
               "# ones; filters match substrings of tensor names; gradients are spread over layers.",
               ""]
        out += self.model_lines
        if self.param_lines:
            out.append("")
            out += self.param_lines
        if self.option_lines:
            out.append("")
            out += self.option_lines
        dtype = self.cfg.get("out_dtype") or self.cfg.get("dtype")
        if dtype:
            out.append("")
            if self.cfg.get("dtype") and not self.cfg.get("out_dtype"):
                out.append("# mergekit's `dtype` is its compute dtype; mergelang computes in float32 and "
                           "writes this dtype")
            out.append(f"option dtype = {fmt(str(dtype))}")
        if self.notes:
            out.append("")
            out += sorted(set(self.notes), key=self.notes.index)
        out.append("")
        self.block_lines = self.render_block(rules, ref)
        return "\n".join(out + self.block_lines) + "\n"

    def render_block(self, rules: list[str], ref: str) -> list[str]:
        name = f"{fmt(self.output_name)} " if self.output_name else ""
        out = [f"merge {name}from {ref} {{"]
        width = max((len(r.split(" => ")[0]) for r in rules if not r.startswith("#")), default=0)
        for r in rules:
            if r.startswith("#"):
                out.append("    " + r)
            else:
                head, expr = r.split(" => ", 1)
                out.append(f"    {head.ljust(width)} => {expr}")
        out.append("}")
        return out


def translate(config: dict[str, Any] | str, config_path: str | Path | None = None,
              out_dir: str | Path | None = None, layer_prefix: str = "model.layers",
              allow_crimes: bool = False, recipe: str | None = None) -> Result:
    """Translate a mergekit config (a dict, or YAML text) into recipe text + diagnostics; a
    mergekit-evolve config also gives `tune_command` (`recipe`: the recipe path it names)."""
    if isinstance(config, str):
        config = load_yaml(config, str(config_path or "<config>"))
    path, out = Path(config_path) if config_path else None, Path(out_dir) if out_dir else None
    if is_evolve_config(config):
        assert isinstance(config, dict)
        return translate_evolve(config, path, out, layer_prefix, recipe)
    problem = check_structure(config)
    if problem is not None:
        return Result("", [problem])
    cls = type("Translator", (Translator,), {"allow_crimes": allow_crimes})
    try:
        if isinstance(config, list):
            return translate_multi(config, path, out, layer_prefix, cls)
        if is_moe_config(config):  # mergekit-moe
            return translate_moe(config, path, out)
        return cls(config, path, out, layer_prefix).translate()
    except RecursionError:
        return Result("", [error("E701", "the config nests too deep")])


def import_file(path: str | Path, out: str | Path | None = None,
                layer_prefix: str = "model.layers", allow_crimes: bool = False) -> Result:
    path = Path(path)
    text = read_config_text(path)
    out_dir = Path(out).parent if out else Path.cwd()
    return translate(load_yaml(text, str(path)), path, out_dir, layer_prefix,  # type: ignore[arg-type]
                     allow_crimes, str(out) if out else None)
