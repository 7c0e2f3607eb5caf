"""Reading mergekit configs for the importer: method tables, models, slices and layer layout.

`ConfigReader` turns the YAML's models / slices into `Slice`s of `Source`s with recipe model
names, reports unknown keys (W101) and non-local model ids (W103), and checks (or, for passthrough
frankenmerges, stacks) the layer layout. `mergekit_import.Translator` builds the rules on top.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelang.diagnostics import Diagnostic, error, warning
from mergelang.interop.mergekit_checks import download_command, hf_cached, hf_id
from mergelang.interop.mergekit_yaml import short

# method -> (calling convention, per-model params it reads, required per-model params)
GTA = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
       "della", "della_linear", "sce")
METHODS: dict[str, tuple[str, bool]] = {  # name -> (convention, weight required)
    "linear": ("models", True),
    "nuslerp": ("models", True),
    "multislerp": ("models", True),
    "karcher": ("models", False),
    "slerp": ("pair", False),
    "nearswap": ("pair", False),
    "model_stock": ("base_models", False),
    "passthrough": ("single", False),
    "ram": ("base_models", False),
    "ramplus_tl": ("base_models", False),
    "arcee_fusion": ("base_models", False),
    **{m: ("base_models", m != "sce") for m in GTA},
}
TAKES_BASE_KW = ("nuslerp", "multislerp")
# mergekit's defaults of per-model parameters (a model without one takes it): method -> values
PER_MODEL_DEFAULTS = {"density": 1.0, "scale": 1.0}
PER_MODEL_METHOD_DEFAULTS = {"breadcrumbs": {"gamma": 0.01}, "breadcrumbs_ties": {"gamma": 0.01},
                             "della": {"epsilon": 0.15}, "della_linear": {"epsilon": 0.15}}
# per-model parameters mergekit accepts but a method ignores (task_arithmetic does not sparsify)
UNUSED_BY_METHOD = {"task_arithmetic": {"density"}, "linear": {"density"}, "karcher": {"density"},
                    "nuslerp": {"density"}, "multislerp": {"density"}}
# parameters mergekit accepts for every method but these methods never read: dropped with W102
UNUSED_GLOBALS = {"sce": {"normalize", "rescale", "lambda"},
                  "model_stock": {"normalize", "rescale", "lambda"},
                  "karcher": {"normalize"},
                  "task_arithmetic": {"rescale"},  # no sparsification: nothing to rescale
                  **{m: {"normalize", "rescale", "lambda"} for m in ("ram", "ramplus_tl",
                                                                    "arcee_fusion")}}
# methods whose mergekit implementation ignores `weight` (karcher: mergelang's own karcher
# honours weights, but an imported config reproduces mergekit, which averages uniformly)
IMPORT_IGNORES_WEIGHTS = ("model_stock", "sce", "karcher", "ram", "ramplus_tl", "arcee_fusion")
#: mergekit's DARE and DELLA rescale what they keep to the task vector's L1 norm by default
L1_RESCALE = ("dare_ties", "dare_linear", "della", "della_linear")
IGNORED_PARAMS = {"int8_mask": "a memory-saving option of mergekit; mergelang computes in float32"}
TOP_KEYS = {"models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "modules", "name"}
MAX_FILTERS = 8
# module names found only inside transformer blocks: filters made of them get no rules for the
# tensors outside the layers (embeddings, final norm, lm_head), which they cannot match
LAYER_ONLY = ("self_attn", "mlp", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
              "down_proj", "input_layernorm", "post_attention_layernorm", "experts", "attn")


def layer_only(f: str) -> bool:
    return any(w in f for w in LAYER_ONLY)


@dataclass
class Source:
    model: str  # recipe model name
    layer_range: tuple[int, int] | None  # None: all layers (a `models:` config)
    params: dict[str, Any]


@dataclass
class Slice:
    sources: list[Source]
    params: dict[str, Any]


@dataclass
class Result:
    text: str
    diagnostics: list[Diagnostic] = field(default_factory=list)
    tune_command: str | None = None  # a mergekit-evolve config: the `mergelang tune` to run
    reads: list[Path] = field(default_factory=list)  # files read besides the config (task YAMLs)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int) and abs(v) >= 10 ** 15:
        v = float(v)  # a literal the recipe's parser reads (at most 77 digits)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_ESCAPES.get(ch) or (ch if ch.isprintable() else _uescape(ch))
                             for ch in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(i) for i in v) + "]"
    if v is None:
        return "none"
    raise TypeError(v)


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _uescape(ch: str) -> str:
    return f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}"


def comment_text(text: str) -> str:
    """`text` safe inside a `#` comment: every character that is not printable (newlines,
    U+2028, U+0085, other controls) written as an escape, so it cannot end the comment."""
    return "".join(ch if ch.isprintable() else _uescape(ch) for ch in text)


def to_ident(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "m"
    return s if not s[0].isdigit() else "m_" + s


def conds(setting: Any) -> list[tuple[str | None, Any]]:
    """A mergekit ParameterSetting as [(filter or None, value)]."""
    if isinstance(setting, dict):
        return [(_filter(setting.get("filter")), setting.get("value"))]
    if isinstance(setting, list) and setting and all(isinstance(c, dict) for c in setting):
        return [(_filter(c.get("filter")), c.get("value")) for c in setting]
    return [(None, setting)]


def _filter(f: Any) -> str | None:
    return None if f in (None, "*") else str(f)


def evaluate(setting: Any, matched: frozenset[str]) -> Any:
    for f, value in conds(setting):
        if f is None or f in matched:
            return value
    return None


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def as_numeric(v: Any) -> Any:
    """A parameter value with numeric-looking strings as numbers: YAML 1.1 reads `1e-10` (no
    dot) as a string, which mergekit's pydantic models coerce to a float; lists likewise."""
    if isinstance(v, str) and _NUMBER.fullmatch(v.strip()):
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    if isinstance(v, list):
        return [as_numeric(x) for x in v]
    return v


def is_gradient(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)



class ConfigReader:
    def __init__(self, config: dict[str, Any], config_path: Path | None, out_dir: Path | None,
                 layer_prefix: str = "model.layers"):
        self.cfg = config
        self.config_path = config_path
        self.out_dir = out_dir
        self.layer_prefix = layer_prefix
        self.diags: list[Diagnostic] = []
        self.models: dict[str, str] = {}  # mergekit reference -> recipe name
        self.model_lines: list[str] = []
        self.hoisted: dict[tuple, str] = {}  # (name, tuple(values)) -> param name
        self.param_lines: list[str] = []
        self.notes: list[str] = []
        self.local_paths: dict[str, Path] = {}  # mergekit reference -> local checkpoint

    # ------------------------------------------------------------ diagnostics
    def warn(self, code: str, msg: str, help: str | None = None) -> None:
        if any(d.code == code and d.message == msg for d in self.diags):
            return  # e.g. found again for another group of tensors
        self.diags.append(warning(code, msg, None, help))
        self.notes.append(f"# NOTE ({code}): {comment_text(msg)}")

    def err(self, code: str, msg: str, help: str | None = None) -> None:
        if any(d.code == code and d.message == msg for d in self.diags):
            return
        self.diags.append(error(code, msg, None, help))

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
            pad = as_numeric(tok.get("pad_to_multiple_of"))
            if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad <= 0):
                self.err("E705", f"tokenizer.pad_to_multiple_of must be a positive whole number, "
                         f"got {short(pad)}")
            elif pad is not None:
                out.append(f"option pad_to_multiple_of = {fmt(pad)}")
        elif tok is not None:
            self.err("E702", "`tokenizer` must be a mapping (source, tokens, pad_to_multiple_of)")
        if source is not None:
            name = source if source in ("base", "union") else self.model(source, "tokenizer source")
            if name is not None:
                out.insert(0, f"option tokenizer_source = {fmt(name)}")
        template = cfg.get("chat_template")
        if isinstance(template, str) and (template == "auto" or "{" in template):
            out.append(f"option chat_template = {fmt(template)}")
        elif template is not None:
            self.warn("W101", f"chat_template {short(template)}: mergekit's bundled templates are not "
                      "translated; put the template's Jinja text in `option chat_template`")
        return out

    # ------------------------------------------------------------ models
    def model(self, ref: Any, where: str, base: bool = False) -> str | None:
        if isinstance(ref, dict):  # mergekit's {model: {path: ...}} form
            ref = ref.get("path", ref.get("model"))
        if not isinstance(ref, str) or not ref:
            self.err("E702", f"{where}: expected a model path or Hugging Face id, got {short(ref)}")
            return None
        if ref in self.models:
            return self.models[ref]
        lora = None
        if "+" in ref and not self._local(ref):  # mergekit's MODEL+LORA: an adapter on a model
            ref_model, lora = ref.split("+", 1)
            adapter = self._local(lora) or hf_cached(lora)
            if adapter is None or not ref_model:
                self.err("E706", f"{where}: `{ref}` applies the LoRA adapter `{lora}`, which is "
                         "not a local folder (nor in the local Hugging Face cache)",
                         "download the adapter, then declare the input as mergelang's own "
                         "`model NAME = lora(\"ADAPTER_DIR\", base = MODEL)`")
                return None
            base_name = self.model(ref_model, where)
            if base_name is None:
                return None
        stem = re.sub(r"\.safetensors$", "", ref.rstrip("/").rsplit("/", 1)[-1])
        name = "base" if base else to_ident(stem)
        taken = set(self.models.values())
        if name in taken or name in ("base",) and not base:
            k = 2
            while f"{name}_{k}" in taken:
                k += 1
            name = f"{name}_{k}"
        self.models[ref] = name
        if lora is not None:
            path = self._recipe_path(adapter)  # type: ignore[arg-type]
            self.model_lines.append(f"model {name} = lora({fmt(path)}, base = {base_name})"
                                    "  # mergekit's MODEL+LORA")
            if ref_model in self.local_paths:
                self.local_paths[ref] = self.local_paths[ref_model]
            return name
        path, comment = self._path(ref)
        self.model_lines.append(f"model {name} = {fmt(path)}{comment}")
        return name

    def _local(self, ref: str) -> Path | None:
        candidates = [Path(ref).expanduser()]
        if self.config_path is not None and not Path(ref).is_absolute():
            candidates.append(self.config_path.parent / ref)
        for c in candidates:
            try:
                if c.exists():
                    return c
            except (OSError, ValueError):  # a name too long, a NUL character
                return None
        return None

    def _recipe_path(self, c: Path) -> str:
        if self.out_dir is not None and not c.is_absolute():
            return os.path.relpath(c.resolve(), self.out_dir.resolve())
        return str(c)

    def _path(self, ref: str) -> tuple[str, str]:
        c = self._local(ref)
        if c is not None:
            self.local_paths[ref] = c
            return self._recipe_path(c), ""
        repo = hf_id(ref)
        if repo is not None:
            snap = hf_cached(ref)
            if snap is not None:  # the recipe names it by id: the cache resolves it at run time
                self.local_paths[ref] = snap
                return "hf:" + ref, ""
        cmd = download_command()
        hint = (f"download it (`{cmd} {repo[0]}" + (f" --revision {repo[1]}" if repo[1] else "")
                + "`): the recipe then finds it in the cache as " + fmt("hf:" + ref)
                if repo else "give the model's local folder")
        self.warn("W103", f"model `{ref}` is not a local path" + (
            " and is not in the local Hugging Face cache" if repo else ""),
                  hint + ", or override it: --set NAME=DIR")
        if repo is not None:
            return "hf:" + ref, "  # not in the local Hugging Face cache: download it first"
        return ref, "  # not found: put the model's local folder here"

    # ------------------------------------------------------------ structure
    def slices(self) -> list[Slice]:
        cfg = self.cfg
        has_models, has_slices = bool(cfg.get("models")), bool(cfg.get("slices"))
        if cfg.get("modules"):
            self.err("E704", "`modules` (multi-module configs) are not supported",
                     "translate each module separately")
            return []
        if has_models == has_slices:
            self.err("E702", "the config needs exactly one of `models` or `slices`")
            return []
        if has_models:
            sources = []
            for k, m in enumerate(cfg["models"]):
                if not isinstance(m, dict):
                    m = {"model": m}
                self._unknown(m, {"model", "parameters"}, f"models[{k}]")
                name = self.model(m.get("model"), f"models[{k}]", base=self._is_base(m.get("model")))
                if name is not None:
                    sources.append(Source(name, None, dict(m.get("parameters") or {})))
            return [Slice(sources, {})]
        out = []
        for k, s in enumerate(cfg["slices"]):
            if not isinstance(s, dict) or not isinstance(s.get("sources"), list):
                self.err("E702", f"slices[{k}]: expected a mapping with a `sources` list")
                continue
            self._unknown(s, {"sources", "parameters", "base_model", "residual_weight"}, f"slices[{k}]")
            if s.get("base_model") not in (None, cfg.get("base_model")):
                self.err("E704", f"slices[{k}]: a per-slice `base_model` is not supported")
            if s.get("residual_weight") is not None:
                self.err("E704", f"slices[{k}]: `residual_weight` is not supported")
            sources = []
            for j, src in enumerate(s["sources"]):
                where = f"slices[{k}].sources[{j}]"
                self._unknown(src, {"model", "layer_range", "parameters"}, where)
                lr = src.get("layer_range")
                if not (isinstance(lr, (list, tuple)) and len(lr) == 2
                        and all(isinstance(x, int) for x in lr) and 0 <= lr[0] < lr[1]):
                    self.err("E702", f"{where}: `layer_range` must be [start, end) with start < end")
                    continue
                name = self.model(src.get("model"), where, base=self._is_base(src.get("model")))
                if name is not None:
                    sources.append(Source(name, (lr[0], lr[1]), dict(src.get("parameters") or {})))
            out.append(Slice(sources, dict(s.get("parameters") or {})))
        return out

    def _is_base(self, ref: Any) -> bool:
        return ref is not None and ref == self.cfg.get("base_model")

    def _unknown(self, d: Any, known: set[str], where: str) -> None:
        if isinstance(d, dict):
            for key in d:
                if key not in known:
                    self.warn("W101", f"{where}.{key} is not translated (unknown key)")

    @staticmethod
    def _in_order(slices: list[Slice]) -> bool:
        offset = 0
        for s in slices:
            for src in s.sources:
                if src.layer_range is not None and src.layer_range[0] != offset:
                    return False
            if s.sources and s.sources[0].layer_range is not None:
                offset = s.sources[0].layer_range[1]
        return True

    def stack(self, slices: list[Slice]) -> list[Slice]:
        """A passthrough frankenmerge: a `stack_layers` model, then rules over its new layers."""
        name = "stacked"
        while name in self.models.values():
            name += "_"
        ranges = ", ".join(f"layer_range({s.sources[0].model}, {s.sources[0].layer_range[0]}, "  # type: ignore[index]
                           f"{s.sources[0].layer_range[1]})" for s in slices)  # type: ignore[index]
        self.model_lines.append("# the layer ranges stacked in order and renumbered (a frankenmerge)")
        self.model_lines.append(f"model {name} = stack_layers([{ranges}])")
        self.models["<stacked>"] = name
        out, offset = [], 0
        for s in slices:
            src = s.sources[0]
            a, b = src.layer_range  # type: ignore[misc]
            out.append(Slice([Source(name, (offset, offset + b - a), src.params)], s.params))
            offset += b - a
        return out

    def check_layout(self, slices: list[Slice], method: str) -> None:
        """mergelang's output follows the reference model's tensor names: every output layer k
        must come from layer k of its inputs (no stacking or renumbering)."""
        offset = 0
        for k, s in enumerate(slices):
            ranges = {src.layer_range for src in s.sources}
            if None in ranges:
                continue
            if len(ranges) > 1:
                self.err("E704", f"slices[{k}]: the sources have different layer ranges "
                         f"({', '.join(str(list(r)) for r in sorted(ranges))})",  # type: ignore[arg-type]
                         "the importer restacks layers when every slice takes equally long ranges "
                         "of the same models; otherwise write the recipe by hand with "
                         "`model x = stack_layers([layer_range(m, a, b), ...])` per model")
                return
            (a, b), = ranges
            if a != offset:
                self.err("E704", f"slices[{k}]: layers {a}..{b - 1} would become output layers "
                         f"{offset}..{offset + b - a - 1}: the importer moves layers for "
                         "passthrough slices of one model only",
                         "write the recipe by hand: stack each source's ranges with "
                         "`model x = stack_layers([layer_range(m, a, b), ...])`, then merge the "
                         "stacked models")
                return
            offset = b

