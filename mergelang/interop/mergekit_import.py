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

What is not translated is reported (warnings W101-W104, errors E701-E706), never dropped silently.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from mergelang.diagnostics import MergelangError, error
from mergelang.io.textfile import read_text, reason
from mergelang.interop.mergekit_moe import is_moe_config, translate_moe
from mergelang.interop.mergekit_multi import translate_multi
from mergelang.interop.mergekit_config import (IMPORT_IGNORES_WEIGHTS, UNUSED_BY_METHOD, UNUSED_GLOBALS, _numeric, IGNORED_PARAMS, MAX_FILTERS, METHODS, PER_MODEL_DEFAULTS, TAKES_BASE_KW,
                              TOP_KEYS, ConfigReader, Result, Slice, Source, _conds, _evaluate, _fmt,
                              _ident, _is_gradient, _layer_only)


class Translator(ConfigReader):
    """Parameters, expressions and rules on top of the config structure."""

    output_name: str | None = None  # a named block (one document of a mergekit-multi file)
    block_lines: list[str] = []
    option_lines: list[str] = []

    def tokenizer_options(self) -> list[str]:
        """`tokenizer_source`, `tokenizer:` and `chat_template` as recipe options."""
        cfg, out = self.cfg, []
        tok = cfg.get("tokenizer")
        source = cfg.get("tokenizer_source")
        if isinstance(tok, dict):
            if source is not None:
                self.err("E702", "give `tokenizer` or `tokenizer_source`, not both (as mergekit)")
                return []
            source = tok.get("source", "union")  # mergekit's TokenizerConfig default
            for k in tok:
                if k not in ("source", "tokens", "pad_to_multiple_of"):
                    self.warn("W101", f"`tokenizer.{k}` is not translated (unknown key)")
            if tok.get("tokens"):
                self.warn("W101", "`tokenizer.tokens` (per-token embedding sources) is not "
                          "translated: tokens a model lacks take mergekit's default sources")
            pad = _numeric(tok.get("pad_to_multiple_of"))
            if pad is not None:
                out.append(f"option pad_to_multiple_of = {_fmt(pad)}")
        elif tok is not None:
            self.err("E702", "`tokenizer` must be a mapping (source, tokens, pad_to_multiple_of)")
        if source is not None:
            name = source if source in ("base", "union") else self.model(source, "tokenizer source")
            if name is not None:
                out.insert(0, f"option tokenizer_source = {_fmt(name)}")
        template = cfg.get("chat_template")
        if isinstance(template, str) and (template == "auto" or "{" in template):
            out.append(f"option chat_template = {_fmt(template)}")
        elif template is not None:
            self.warn("W101", f"chat_template {template!r}: mergekit's bundled templates are not "
                      "translated; put the template's Jinja text in `option chat_template`")
        return out

    # ------------------------------------------------------------ parameters
    def lookup(self, name: str, src: Source | None, sl: Slice, matched: frozenset[str]) -> Any:
        chain = [sl.params, self.cfg.get("parameters") or {}]
        if src is not None:
            chain.insert(0, src.params)
        for d in chain:
            if name in d:
                v = _evaluate(d[name], matched)
                if v is not None:
                    return v
        return None

    def value(self, v: Any, root: str, pname: str, t_expr: str) -> str:
        v = _numeric(v)
        if _is_gradient(v):
            if len(v) == 1:
                return _fmt(v[0])
            return f"gradient({self.hoist(root, pname, v)}, {t_expr})"
        if isinstance(v, list):
            self.err("E705", f"parameter `{pname}`: a list of {v!r} is not a gradient of numbers")
            return _fmt(None)
        return _fmt(v)

    def hoist(self, root: str, pname: str, values: list) -> str:
        key = (root, tuple(values))
        if key in self.hoisted:
            return self.hoisted[key]
        name = _ident(pname)
        taken = set(self.hoisted.values()) | set(self.models.values())
        cand, k = name, 2
        while cand in taken:
            cand, k = f"{name}_{k}", k + 1
        self.hoisted[key] = cand
        self.param_lines.append(f"param {cand} = {_fmt(values)}")
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
            if len(sl.sources) != 1:
                self.err("E702", f"passthrough takes exactly one model per slice, got {len(sl.sources)}")
                return "none"
            src = sl.sources[0]
            scale = self.lookup("scale", src, sl, matched)
            if scale is None:
                return src.model
            return f"passthrough({src.model}, scale = {self.value(scale, 'scale', 'scale' + suffix, t_expr)})"
        if conv == "pair":
            if base is None:
                self.err("E705", f"{method} needs `base_model`")
                return "none"
            others = [s for s in sl.sources if s.model != base]
            if len(others) != 1 or len(sl.sources) > 2:
                self.err("E702", f"{method} merges exactly two models (base_model and one other), "
                         f"got {len(sl.sources)}")
                return "none"
            t = self.lookup("t", None, sl, matched)
            if t is None:
                self.err("E705", f"{method} needs parameter `t`")
                return "none"
            self._globals(method, sl, matched, t_expr, suffix, kwargs, skip={"t"})
            return f"{method}({base}, {others[0].model}, t = {self.value(t, 't', 't' + suffix, t_expr)}" + \
                "".join(", " + k for k in kwargs) + ")"
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
            vals = []
            for src in members:
                v = self.lookup(p, src, sl, matched)
                if v is None:
                    v = PER_MODEL_DEFAULTS.get(p)
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
            v = self.lookup(n, None, sl, matched)
            if v is None:
                continue
            kw = "weights" if n == "weight" else n
            kwargs.append(f"{kw} = {self.value(v, n, n + suffix, t_expr)}")

    # ------------------------------------------------------------ rules
    def filters(self, slices: list[Slice]) -> list[str]:
        out: list[str] = []
        settings = list((self.cfg.get("parameters") or {}).values())
        for sl in slices:
            settings += list(sl.params.values())
            for src in sl.sources:
                settings += list(src.params.values())
        for s in settings:
            for f, _ in _conds(s):
                if f is not None and f not in out:
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
            expr = self.call(method, sl, s, t_expr, _ident(filt) if filt else "")
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
        orders = itertools.permutations([re.escape(f) for f in required])
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
            self.err("E703", f"unknown merge_method {method!r}",
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
        if any(d.is_error for d in self.diags) or not slices:
            return Result("", self.diags)
        ref = self.models.get(base_ref) if base_ref else slices[0].sources[0].model
        if method == "passthrough" and not self._in_order(slices) and \
                all(len(s.sources) == 1 for s in slices):
            slices = self.stack(slices)
            ref = self.models["<stacked>"]
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
        outer = [f for f in filters if not _layer_only(f)]
        # mergekit plans the tensors outside the layer stack (embeddings, final norm, lm_head)
        # with t = 0: their gradients take their first value
        pre = self.region_rules(method, slices[0], outer, "0")
        post = self.region_rules(method, slices[-1], outer, "0")
        lines: list[str] = []
        if pre == post:
            nonlayer = [("# embeddings, final norm and lm_head: gradients at t = 0 (as mergekit)", None,
                         post)]
        else:
            nonlayer = [("# tensors before the layers (embeddings), first slice: gradients at t = 0",
                         "embed", pre),
                        ("# tensors after the layers (final norm, lm_head), last slice: gradients at "
                         "t = 0 (as mergekit)", None, post)]
        if pre == post and all(rules == post for _, rules in layer_blocks):
            return [self._rule(s, e, None, False, None) for s, e in post]
        for k, (guard, rules) in enumerate(layer_blocks):
            lr = slices[k].sources[0].layer_range
            what = "all layers" if lr is None else f"layers {lr[0]}..{lr[1] - 1}"
            lines.append(f"# {what}: gradients run from t = 0 at the first layer to t = 1 at the last")
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
        src = f" {self.config_path.name}" if self.config_path else ""
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
            out.append(f"option dtype = {_fmt(str(dtype))}")
        if self.notes:
            out.append("")
            out += sorted(set(self.notes), key=self.notes.index)
        out.append("")
        self.block_lines = self.render_block(rules, ref)
        return "\n".join(out + self.block_lines) + "\n"

    def render_block(self, rules: list[str], ref: str) -> list[str]:
        name = f"{_fmt(self.output_name)} " if self.output_name else ""
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
              out_dir: str | Path | None = None, layer_prefix: str = "model.layers") -> Result:
    """Translate a mergekit config (a dict, or YAML text) into recipe text + diagnostics."""
    if isinstance(config, str):
        config = _load_yaml(config, str(config_path or "<config>"))
    if isinstance(config, list):
        return translate_multi(config, Path(config_path) if config_path else None,
                               Path(out_dir) if out_dir else None, layer_prefix, Translator)
    if not isinstance(config, dict):
        return Result("", [error("E702", "a mergekit config must be a YAML mapping")])
    if is_moe_config(config):  # mergekit-moe
        return translate_moe(config, Path(config_path) if config_path else None,
                             Path(out_dir) if out_dir else None)
    t = Translator(config, Path(config_path) if config_path else None,
                   Path(out_dir) if out_dir else None, layer_prefix)
    return t.translate()


def _load_yaml(text: str, where: str) -> Any:
    """The config; a list of configs for a multi-document (mergekit-multi) file."""
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise MergelangError(error("E701", f"cannot parse {where}: {exc}")) from None
    return docs[0] if len(docs) == 1 else docs


#: a mergekit config is kilobytes (the recipe it becomes has the recipe loader's bound)
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def import_file(path: str | Path, out: str | Path | None = None,
                layer_prefix: str = "model.layers") -> Result:
    path = Path(path)
    try:
        text = read_text(path, MAX_CONFIG_BYTES)
    except (OSError, ValueError) as exc:
        raise MergelangError(error("E701", f"cannot read {path}: {reason(exc)}")) from None
    out_dir = Path(out).parent if out else Path.cwd()
    return translate(_load_yaml(text, str(path)), path, out_dir, layer_prefix)  # type: ignore[arg-type]
