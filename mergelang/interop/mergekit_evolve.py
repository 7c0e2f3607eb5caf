"""mergekit-evolve configs (`genome:` + `tasks:`) -> a recipe whose params carry ranges, plus the
`mergelang tune` command that searches them against the same lm-eval tasks.

mergekit's genome (mergekit/evo/genome.py) is a tensor of shape (layer groups, models, filters + 1,
method params): `weight` (linear, task_arithmetic), `weight` and `density` (ties, dare_ties), a
per-model weight turned into `t` (slerp). Each coordinate becomes one element of a list param:
`param weight_a_mlp = [0.5, 0.5] in [0, 1]` is model a's weight, filter `mlp`, per layer group,
read by the rules as `weight_a_mlp[i // STEP]` (`smooth: true`: as a gradient over the layers,
`gradient(weight_a, i / (L - 1))`, as mergekit's `models:` lists). The phenotype of a genotype
is exactly mergekit's `genotype_merge_config(genotype)` imported by `import-mergekit` (tests
check it side by side): weights |x| (x with `allow_negative_weights`), density clamp(|x|, 0, 1),
`normalize` defaulting to true for linear, ties and dare_ties, `int8_mask` (no effect),
`dtype: bfloat16` as `option dtype`. Tensors before the layers take group 0's values, those after
them the last group's (mergekit's planner). What is not translated: W112 (evaluation settings),
W113 (the search's coordinates differ), E711 (genome), E712 (tasks); docs/guide.md, section 4.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelang.interop.mergekit_checks import layer_count
from mergelang.interop.mergekit_config import ConfigReader, Result, to_ident, comment_text, fmt, layer_only
from mergelang.interop.mergekit_yaml import short

EVOLVE_KEYS = ("genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init",
               "apply_chat_template", "fewshot_as_multiturn")
GENOME_KEYS = ("models", "merge_method", "base_model", "tokenizer_source", "layer_granularity",
               "normalize", "allow_negative_weights", "filters", "smooth")
#: mergekit/evo/genome.py METHOD_PARAM_MAPS
METHOD_PARAMS = {"linear": ("weight",), "task_arithmetic": ("weight",),
                 "ties": ("weight", "density"), "dare_ties": ("weight", "density"), "slerp": ("t",)}
NEEDS_BASE = ("ties", "dare_ties", "task_arithmetic")
#: mergekit-evolve's own defaults (--max-fevals 100, CMA-ES)
DEFAULT_TRIALS = 100
TASK_CHARS = ",=*/ \t\n"


def is_evolve_config(cfg: Any) -> bool:
    return isinstance(cfg, dict) and "genome" in cfg and "tasks" in cfg


@dataclass
class Genome:
    method: str
    models: list[str]  # recipe names, in genome order
    base: str | None
    filters: list[str]
    groups: int
    step: int  # layers per group
    layers: int | None
    smooth: bool
    normalize: bool
    negative: bool


class EvolveReader(ConfigReader):
    """Reads `genome:` (models through ConfigReader.model: local paths, the HF cache, W103)."""

    def genome(self) -> Genome | None:
        g = self.cfg  # the reader's config is the genome mapping (tokenizer_options reads it)
        for k in g:
            if k not in GENOME_KEYS:
                self.warn("W101", f"genome.{k} is not translated (unknown key)")
        method = g.get("merge_method")
        if not isinstance(method, str) or method not in METHOD_PARAMS:
            self.err("E711", f"genome.merge_method {short(method)}: mergekit-evolve searches "
                     + ", ".join(METHOD_PARAMS))
            return None
        refs = g.get("models")
        if not isinstance(refs, list) or not refs:
            self.err("E711", "genome.models must be a non-empty list of models")
            return None
        base = self.model(g["base_model"], "genome.base_model", base=True) \
            if g.get("base_model") is not None else None
        models = [self.model(r, f"genome.models[{k}]") for k, r in enumerate(refs)]
        if any(m is None for m in models) or any(d.is_error for d in self.diags):
            return None
        filters = g.get("filters") or []
        if not isinstance(filters, list) or not all(
                isinstance(f, str) and f and f.isprintable() and not any(c in f for c in '*?{}[]"\\')
                for f in filters):
            self.err("E711", f"genome.filters must be a list of tensor-name substrings (no glob "
                     f"characters), got {short(filters)}")
            return None
        return self._shape(g, method, models, base, filters)  # type: ignore[arg-type]

    def _shape(self, g: dict, method: str, models: list[str], base: str | None,
               filters: list[str]) -> Genome | None:
        flags = {k: g.get(k, d) for k, d in (("smooth", False), ("allow_negative_weights", False),
                                             ("normalize", None), ("layer_granularity", 0))}
        if any(not isinstance(flags[k], bool) for k in ("smooth", "allow_negative_weights")) or \
                flags["normalize"] not in (None, True, False) or \
                not isinstance(flags["layer_granularity"], int) or isinstance(flags["layer_granularity"], bool):
            self.err("E711", "genome: smooth, allow_negative_weights, normalize are true/false and "
                     "layer_granularity a whole number")
            return None
        gran, smooth = flags["layer_granularity"], flags["smooth"]
        if method in NEEDS_BASE and base is None:
            self.err("E711", f"genome: {method} needs base_model (mergekit refuses it too)")
            return None
        if method == "slerp" and (smooth or filters or len(models) != 2):
            self.err("E711", "genome: slerp is translated for exactly two models without filters "
                     "or smooth (mergekit refuses filters and smooth; with more models its genotype "
                     "picks the two heaviest per layer group, which no range expresses)")
            return None
        if method == "linear" and base is not None and base not in models:
            self.err("E711", "genome: linear with a base_model that is not one of the models "
                     "(mergekit adds it without a weight, which linear requires)")
            return None
        layers = self._layers(models[0])
        if (gran > 0 or smooth) and layers is None:
            self.err("E711", f"genome: the layer count of `{models[0]}` is unknown (not a local "
                     "model), and the genome has one value per layer group",
                     "download the model first (mergekit reads its config.json)")
            return None
        if gran > 0 and layers is not None and layers % gran:
            self.err("E711", f"genome: {layers} layers are not a multiple of layer_granularity {gran} "
                     "(mergekit refuses it too)")
            return None
        groups = layers // gran if gran > 0 and layers else 1
        normalize = flags["normalize"]
        if normalize is None:
            normalize = method in ("ties", "dare_ties", "linear")
        return Genome(method, models, base, filters, groups, gran if gran > 0 else (layers or 0),
                      layers, smooth, normalize, flags["allow_negative_weights"])

    def _layers(self, name: str) -> int | None:
        ref = next((r for r, n in self.models.items() if n == name), None)
        path = self.local_paths.get(ref) if ref is not None else None
        if path is None:
            return None
        try:  # mergekit reads num_hidden_layers from the config
            from mergelang.io.textfile import read_json

            n = read_json((path if path.is_dir() else path.parent) / "config.json", obj=True).get(
                "num_hidden_layers")
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n
        except (OSError, ValueError):
            pass
        return layer_count(path, self.layer_prefix)


class EvolveTranslator(EvolveReader):
    """The recipe's params and rules for a Genome."""

    def params(self, g: Genome) -> dict[tuple[str, str, str | None], str]:
        """(method param, model, filter) -> param name; declares them (one value per group)."""
        names: dict[tuple[str, str, str | None], str] = {}
        n = len(g.models)
        for m in self.members(g):
            for p in METHOD_PARAMS[g.method]:
                for f in [*g.filters, None]:
                    name = to_ident("_".join([p, m] + ([f] if f else [])))
                    taken = set(names.values()) | set(self.models.values())
                    cand, k = name, 2
                    while cand in taken:
                        cand, k = f"{name}_{k}", k + 1
                    names[(p, m, f)] = cand
                    x0 = 1.0 if p == "density" else 0.5 if p == "t" else 1 / n
                    lo = -1 if p == "weight" and g.negative else 0
                    value = fmt(x0) if g.groups == 1 else fmt([x0] * g.groups)
                    self.param_lines.append(f"param {cand} = {value} in [{lo}, 1]")
        return names

    def members(self, g: Genome) -> list[str]:
        if g.method == "slerp":
            return [g.models[0]]  # one t per group (see W113)
        if g.method in NEEDS_BASE and g.base in g.models:
            self.warn("W113", f"base_model `{g.base}` is also one of genome.models: its "
                      f"coordinates have no effect on {g.method} (mergekit ignores them too) and "
                      "are left out of the search")
            return [m for m in g.models if m != g.base]
        return list(g.models)

    def call(self, g: Genome, names: dict, f: str | None, at: str | None) -> str:
        """The method call for filter `f` with each param read at group `at` (an expression;
        None: the whole value, gradient(...) when smooth)."""
        def ref(p: str, m: str) -> str:
            name = names[(p, m, f)]
            if g.groups == 1:
                return name
            if at is None:  # smooth: a gradient over the layers, as mergekit's models: lists
                t = "1" if (g.layers or 1) == 1 else f"i / {(g.layers or 1) - 1}"
                return f"gradient({name}, {t})"
            return f"{name}[{at}]"

        members = self.members(g)
        if g.method == "slerp":
            return f"slerp({g.models[0]}, {g.models[1]}, t = {ref('t', g.models[0])})"
        kw = []
        if "density" in METHOD_PARAMS[g.method]:
            kw.append("density = [" + ", ".join(ref("density", m) for m in members) + "]")
        kw.append("weights = [" + ", ".join(ref("weight", m) for m in members) + "]")
        kw.append(f"normalize = {fmt(g.normalize)}")
        if g.method == "dare_ties":
            kw.append('rescale = "l1"')  # mergekit's default for DARE
        models = "[" + ", ".join(members) + "]"
        head = f"{g.method}({models}" if g.method == "linear" else f"{g.method}({g.base}, {models}"
        return head + "".join(", " + k for k in kw) + ")"

    def rules(self, g: Genome, names: dict) -> list[str]:
        prefix = self.layer_prefix
        layer_at = None if g.smooth else "i" if g.groups > 1 and g.step == 1 else f"i // {g.step}"
        lines: list[str] = []
        if g.groups > 1:
            what = "a gradient over the layers" if g.smooth else f"layer group i // {g.step}"
            lines.append(f"# layers: each value is {what}")
            for f in g.filters:
                lines.append((f'"{prefix}.{{i}}.*{f}*"', self.call(g, names, f, layer_at)))
            lines.append((f'"{prefix}.{{i}}.*"', self.call(g, names, None, layer_at)))
        outer = [f for f in g.filters if not layer_only(f) or g.groups == 1]
        if g.groups == 1 or g.smooth:
            at = None if g.groups == 1 else "0"
            if g.groups > 1:
                lines.append("# embeddings, final norm and lm_head: t = 0, the first value (as mergekit)")
            for f in outer:
                pat = f'"{prefix}.{{i}}.*{f}*"' if layer_only(f) else f'"*{f}*"'
                lines.append((pat, self.call(g, names, f, at)))
            lines.append(('"*"', self.call(g, names, None, at)))
            return lines
        last = str(g.groups - 1)
        lines.append("# tensors before the layers (embeddings): the first group's values")
        for f in outer:
            lines.append((_contains(["embed", f]), self.call(g, names, f, "0")))
        lines.append(('"*embed*"', self.call(g, names, None, "0")))
        lines.append("# tensors after the layers (final norm, lm_head): the last group's values")
        for f in outer:
            lines.append((f'"*{f}*"', self.call(g, names, f, last)))
        lines.append(('"*"', self.call(g, names, None, last)))
        return lines


def _contains(required: list[str]) -> str:
    """A pattern matching names that contain every string of `required` (any order)."""
    import itertools
    import re

    orders = itertools.permutations([re.escape(f).replace('"', '\\"') for f in required])
    return 're"(?:' + "|".join(".*" + ".*".join(o) + ".*" for o in orders) + ')"'


def task_spec(r: ConfigReader, tasks: Any) -> str | None:
    """`lm-eval:TASK=METRIC*WEIGHT,...` for mergekit's tasks (name, weight = 1, metric "acc,none")."""
    if not isinstance(tasks, list) or not tasks:
        r.err("E712", f"`tasks` must be a non-empty list of lm-eval tasks, got {short(tasks)}")
        return None
    entries = []
    for k, t in enumerate(tasks):
        t = {"name": t} if isinstance(t, str) else t
        if not isinstance(t, dict):
            r.err("E712", f"tasks[{k}]: expected a task name or {{name, weight, metric}}, got {short(t)}")
            return None
        for key in t:
            if key not in ("name", "weight", "metric"):
                r.warn("W101", f"tasks[{k}].{key} is not translated (unknown key)")
        name, weight, metric = t.get("name"), t.get("weight", 1.0), t.get("metric", "acc,none")
        if not isinstance(name, str) or not name or any(c in name for c in TASK_CHARS):
            r.err("E712", f"tasks[{k}]: task name {short(name)} cannot be written in "
                  "--objective lm-eval:TASKS (empty, or holds one of , = * / or a space)")
            return None
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            r.err("E712", f"tasks[{k}]: weight {short(weight)} is not a finite number")
            return None
        parts = metric.split(",") if isinstance(metric, str) else []
        if len(parts) != 2 or not all(parts) or any(c in metric for c in "=*/ \t\n"):
            r.err("E712", f"tasks[{k}]: metric {short(metric)} is not lm-eval's METRIC,FILTER "
                  "(e.g. acc,none)")
            return None
        m = parts[0] if parts[1] == "none" else f"{parts[0]}/{parts[1]}"
        entries.append(f"{name}={m}" + ("" if weight == 1 else f"*{fmt(float(weight))}"))
    return "lm-eval:" + ",".join(entries)


def eval_settings(r: ConfigReader, cfg: dict) -> list[str] | None:
    """tune options for limit / num_fewshot; W112 for what lm-eval would do differently."""
    opts = []
    for key in ("limit", "num_fewshot"):
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "limit" else 0):
            r.err("E712", f"`{key}` must be a whole number{' >= 1' if key == 'limit' else ''}, got {short(v)}")
            return None
        opts.append(f"--{key.replace('_', '-')} {v}")
    if cfg.get("shuffle"):
        r.warn("W112", "shuffle is not translated: mergekit shuffles each task's documents before "
               "taking `limit` of them; mergelang's lm-eval objective takes the first ones")
    if cfg.get("random_init"):
        r.warn("W112", "random_init is not translated: the params start at mergekit's fixed x0 "
               "(weights 1/n, density 1); tune's samplers draw their own points")
    if cfg.get("apply_chat_template", True) is not False:
        r.warn("W112", "apply_chat_template (mergekit's default: true) is not translated: "
               "mergelang's lm-eval objective evaluates without the chat template (fewshot_as_"
               "multiturn neither); scores equal mergekit's only for models without one",
               "set apply_chat_template: false in the config to say the evaluation needs none")
    return opts


def task_files(config_path: Path | None, names: list[str]) -> list[Path]:
    """The task YAMLs in the config's folder (or one level below) that define one of `names`
    (`task: NAME`): that folder is the --lm-eval-include to give (lm-eval reads task folders
    recursively), and these files are inputs an -o must not replace."""
    import re

    from mergelang.io.textfile import read_text

    if config_path is None:
        return []
    root = config_path.parent
    found = []
    files = [p for pat in ("*.yaml", "*.yml", "*/*.yaml", "*/*.yml") for p in sorted(root.glob(pat))]
    rx = re.compile(r"^task:\s*['\"]?(" + "|".join(re.escape(n) for n in names) + r")['\"]?\s*$", re.M)
    for p in files[:500]:
        if p.resolve() == config_path.resolve():
            continue
        try:
            if rx.search(read_text(p, 1 << 20)):
                found.append(p)
        except (OSError, ValueError):
            continue
    return found


def translate_evolve(cfg: dict[str, Any], config_path: Path | None, out_dir: Path | None,
                     layer_prefix: str = "model.layers", recipe: str | None = None) -> Result:
    """A mergekit-evolve config -> Result(recipe text, diagnostics, tune_command)."""
    genome_cfg = cfg.get("genome")
    t = EvolveTranslator(genome_cfg if isinstance(genome_cfg, dict) else {}, config_path, out_dir,
                         layer_prefix)
    for key in cfg:
        if key not in EVOLVE_KEYS:
            t.warn("W101", f"`{key}` is not translated (unknown mergekit-evolve key)")
    if not isinstance(genome_cfg, dict):
        t.err("E711", f"`genome` must be a mapping, got {short(genome_cfg)}")
        return Result("", t.diags)
    g = t.genome()
    spec = task_spec(t, cfg.get("tasks"))
    opts = eval_settings(t, cfg)
    if g is None or spec is None or opts is None or any(d.is_error for d in t.diags):
        return Result("", t.diags)
    if g.method == "slerp":
        t.warn("W113", "slerp genome: mergekit keeps two weights per layer group and slerps from "
               "the heavier model to the other with t = softmax(weights)[1]; the recipe searches "
               "t in [0, 1] per group directly: the same merges (slerp(a, b, t) = slerp(b, a, 1 - "
               "t)), one coordinate per group instead of two")
    options = t.tokenizer_options()
    names = t.params(g)
    rules = t.rules(g, names)
    tasks = task_files(config_path, [e.split("=")[0] for e in spec[len("lm-eval:"):].split(",")])
    if tasks and config_path is not None:
        opts.append(f"--lm-eval-include {shlex.quote(_rel(config_path.parent))}")
    command = " ".join(["mergelang tune", shlex.quote(recipe or "RECIPE.mrg"), "--objective",
                        shlex.quote(spec), f"--trials {DEFAULT_TRIALS} --sampler cmaes", *opts,
                        "-o merged-best"])
    return Result(render(t, g, options, rules, command), t.diags, command, tasks)


def _rel(p: Path) -> str:
    import os

    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


def render(t: EvolveTranslator, g: Genome, options: list[str], rules: list, command: str) -> str:
    src = f" {comment_text(t.config_path.name)}" if t.config_path else ""
    groups = (f"{g.groups} layer groups of {g.step} layers" if g.groups > 1 and not g.smooth else
              f"{g.groups} values per param spread over the layers (smooth)" if g.groups > 1 else
              "one value per param for all layers")
    out = [f"# Translated from the mergekit-evolve config{src} by `mergelang import-mergekit`.",
           f"# genome: {g.method}, {groups}, filters: {', '.join(g.filters) or 'none'}; each "
           "searched value is one", "# coordinate of mergekit's genotype. Search it with:",
           f"#   {comment_text(command)}", ""]
    out += t.model_lines + [""] + t.param_lines + [""]
    out += options + ['option dtype = "bfloat16"  # mergekit-evolve merges in bfloat16']
    if t.notes:
        out += [""] + sorted(set(t.notes), key=t.notes.index)
    out += ["", f"merge from {g.base or g.models[0]} {{"]
    width = max(len(r[0]) for r in rules if isinstance(r, tuple))
    for r in rules:
        out.append("    " + (r if isinstance(r, str) else f"{r[0].ljust(width)} => {r[1]}"))
    return "\n".join(out + ["}"]) + "\n"
