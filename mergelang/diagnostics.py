"""Source spans and diagnostics: `file:line:col`, the source line, a caret, a code and a hint.

Every user-facing error in mergelang is a :class:`Diagnostic`. Errors are collected (not raised
one by one) so that a single `mergelang check` reports everything it can find; the stage that
collected them raises one :class:`MergelangError` carrying all of them.
"""

from __future__ import annotations

import bisect
import difflib
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


@dataclass(frozen=True, eq=False)
class SourceFile:
    """A recipe's text and where it came from (identity-compared: one object per loaded file)."""

    path: str
    text: str
    library: bool = False  # a standard-library file: errors inside it point at the user's call

    def __post_init__(self) -> None:
        starts = [0]
        for i, ch in enumerate(self.text):
            if ch == "\n":
                starts.append(i + 1)
        object.__setattr__(self, "_line_starts", starts)

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        starts: list[int] = self._line_starts  # type: ignore[attr-defined]
        line = bisect.bisect_right(starts, offset) - 1
        return line + 1, offset - starts[line] + 1

    def line_text(self, line: int) -> str:
        starts: list[int] = self._line_starts  # type: ignore[attr-defined]
        start = starts[line - 1]
        end = starts[line] - 1 if line < len(starts) else len(self.text)
        return self.text[start:end]

    @property
    def display_path(self) -> str:
        return "stdlib/" + Path(self.path).name if self.library else self.path

    @classmethod
    def read(cls, path: str | Path, library: bool = False) -> "SourceFile":
        return cls(str(path), Path(path).read_text(encoding="utf-8"), library)


@dataclass(frozen=True)
class Span:
    """A half-open character range [start, end) in a source file."""

    source: SourceFile
    start: int
    end: int

    @property
    def line(self) -> int:
        return self.source.position(self.start)[0]

    @property
    def col(self) -> int:
        return self.source.position(self.start)[1]

    @property
    def text(self) -> str:
        return self.source.text[self.start : self.end]

    def location(self) -> str:
        line, col = self.source.position(self.start)
        return f"{self.source.display_path}:{line}:{col}"

    def to(self, other: "Span") -> "Span":
        return Span(self.source, min(self.start, other.start), max(self.end, other.end))

    def __repr__(self) -> str:  # short and stable, for --emit output and test failures
        return f"<{self.location()}>"


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None = None
    help: str | None = None
    notes: tuple[tuple[str, Span | None], ...] = ()
    severity: Severity = Severity.ERROR

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def with_note(self, text: str, span: Span | None = None) -> "Diagnostic":
        return Diagnostic(
            self.code, self.message, self.span, self.help, self.notes + ((text, span),), self.severity
        )

    def render(self, color: bool = False) -> str:
        return render(self, color=color)

    def __str__(self) -> str:
        return self.render()


def _style(text: str, code: str, color: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if color else text


def _snippet(span: Span, color: bool, marker: str = "^") -> list[str]:
    src = span.source
    line, col = src.position(span.start)
    end_line, end_col = src.position(max(span.start, span.end - 1))
    text = src.line_text(line)
    width = len(str(line))
    gutter = " " * width + " |"
    if end_line == line:
        length = max(1, end_col - col + 1)
    else:
        length = max(1, len(text) - col + 1)
    caret = " " * (col - 1) + marker * length
    return [
        _style(gutter, "34", color),
        _style(f"{line} |", "34", color) + " " + text,
        _style(gutter, "34", color) + " " + _style(caret, "31;1", color),
    ]


def render(diag: Diagnostic, color: bool = False) -> str:
    """Render in the familiar rustc/xdsl style::

        error[E103]: unknown keyword argument `densty` for `ties`
          --> recipe.mrg:12:36
           |
        12 |     "*" => ties(base, [a, b], densty = 0.5)
           |                               ^^^^^^
           = help: did you mean `density`?
    """
    sev = diag.severity.value
    head_color = {"error": "31;1", "warning": "33;1", "note": "36;1"}[sev]
    lines = [_style(f"{sev}[{diag.code}]", head_color, color) + _style(f": {diag.message}", "1", color)]
    pad = " "
    if diag.span is not None:
        pad = " " * (len(str(diag.span.line)) + 1)
        lines.append(f"{pad[:-1]}--> {diag.span.location()}")
        lines.extend(_snippet(diag.span, color))
    for text, span in diag.notes:
        if span is not None:
            lines.append(f"{pad}= note: {text} ({span.location()})")
        else:
            lines.append(f"{pad}= note: {text}")
    if diag.help:
        lines.append(f"{pad}= help: {diag.help}")
    return "\n".join(lines)


class MergelangError(Exception):
    """Raised by the public API when a recipe or its inputs have errors; carries all diagnostics."""

    def __init__(self, diagnostics: Sequence[Diagnostic] | Diagnostic):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        super().__init__(self.render())

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]

    def render(self, color: bool = False) -> str:
        errors = [d for d in self.diagnostics if d.is_error]
        body = "\n\n".join(d.render(color) for d in self.diagnostics)
        n = len(errors)
        if n > 1:
            body += f"\n\n{n} errors"
        return body


class Diagnostics:
    """An ordered, de-duplicated collection of diagnostics for one compilation."""

    def __init__(self) -> None:
        self._items: list[Diagnostic] = []
        self._seen: dict[tuple, int] = {}
        self._repeats: dict[tuple, list[str]] = {}
        self.added = 0  # every add, repeats included (elaboration templates: lang/templates.py)

    def add(self, diag: Diagnostic, subject: str | None = None) -> None:
        """Add `diag`; the same (code, span, message-shape) for another tensor counts as a repeat."""
        self.added += 1
        key = (diag.code, diag.span.source if diag.span else None,
               diag.span.start if diag.span else None, diag.span.end if diag.span else None,
               diag.message if subject is None else diag.message.replace(f"`{subject}`", "\0"))
        if key in self._seen:
            if subject is not None and f"`{subject}`" in diag.message:
                self._repeats[key].append(subject)
            return
        self._seen[key] = len(self._items)
        self._repeats[key] = []
        self._items.append(diag)

    def extend(self, diags: Iterable[Diagnostic]) -> None:
        for d in diags:
            self.add(d)

    @property
    def items(self) -> list[Diagnostic]:
        out = list(self._items)
        for key, idx in self._seen.items():
            others = self._repeats[key]
            if others:
                shown = ", ".join(f"`{o}`" for o in others[:3])
                more = f" and {len(others) - 3} more" if len(others) > 3 else ""
                out[idx] = out[idx].with_note(f"the same error occurs for {shown}{more}")
        return out

    @property
    def has_errors(self) -> bool:
        return any(d.is_error for d in self._items)

    def raise_if_errors(self) -> None:
        if self.has_errors:
            raise MergelangError(self.items)


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A `help:` text suggesting the closest candidate names, or None."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=2, cutoff=0.6)
    if not matches:
        return None
    if len(matches) == 1:
        return f"did you mean `{matches[0]}`?"
    return f"did you mean `{matches[0]}` or `{matches[1]}`?"


def error(code: str, message: str, span: Span | None = None, help: str | None = None,
          notes: tuple[tuple[str, Span | None], ...] = ()) -> Diagnostic:
    return Diagnostic(code, message, span, help, notes, Severity.ERROR)


def warning(code: str, message: str, span: Span | None = None, help: str | None = None,
            notes: tuple[tuple[str, Span | None], ...] = ()) -> Diagnostic:
    return Diagnostic(code, message, span, help, notes, Severity.WARNING)


class CompileError(Exception):
    """Internal control flow: aborts evaluation of one construct with one diagnostic."""

    def __init__(self, diag: Diagnostic):
        self.diag = diag
        super().__init__(diag.message)


# One registry of diagnostic codes, so docs and tests can enumerate them.
CODES: dict[str, str] = {
    # syntax and files
    "E001": "syntax error",
    "E002": "cannot read recipe or imported file",
    "E003": "import cycle",
    # names and calls
    "E101": "unknown name",
    "E102": "unknown function",
    "E103": "unknown keyword argument",
    "E104": "missing argument",
    "E105": "too many positional arguments",
    "E106": "duplicate definition",
    "E107": "argument given twice",
    "E108": "recursive function",
    "E109": "invalid pattern",
    "E110": "recipe nested too deeply",
    "E111": "bad comprehension target",
    "E112": "cannot iterate or unpack in a comprehension",
    "E113": "comprehension or range too long",
    "E114": "plugin not found or failing to load",
    "E115": "plugin signature mismatch",
    "E116": "plugins are off",
    "E117": "plugin method failed at run time",
    # types and values
    "E201": "type mismatch",
    "E202": "shape mismatch",
    "E203": "invalid value",
    "E204": "assertion failed",
    "E205": "division by zero",
    "E206": "unsupported dtype",
    "E207": "output shape differs from the reference model",
    "E210": "sidecar tensor has the wrong shape",
    "E220": "a model-wide statistic's fraction is not a number in [0, 1]",
    "E221": "a model-wide statistic needs float values",
    "E222": "NaN or infinite values in an input tensor (option nan_check = \"error\")",
    "E230": "model_quantile_value's offset is not an integer known at compile time",
    # models and checkpoints
    "E301": "model not found",
    "E302": "tensor missing in a model",
    "E303": "invalid checkpoint",
    "E304": "no rule matches a tensor",
    "E305": "no merge block",
    "E306": "unsafe checkpoint (pickle)",
    "E307": "checkpoint index names a missing shard",
    "E308": "checkpoint index names a file outside the model folder",
    "E309": "pickle checkpoint refused by torch.load(weights_only=True)",
    "E310": "an output name is used twice",
    "E311": "an unnamed merge block mixed with named ones",
    "E312": "invalid output name",
    "E313": "a rule gives a different number of tensors than its block has outputs",
    "E314": "a model file is a symbolic link leaving its model folder",
    "E315": "a copied model file (config.json, tokenizer) is not valid JSON",
    "E316": "output(NAME) names no merge block's output",
    "E317": "merge blocks' outputs depend on each other in a cycle",
    "E318": "the output tokenizer (tokenizer_source) cannot be built",
    "E319": "a `merge adapter` block misused (low_rank elsewhere, a rule giving another shape, used as a model)",
    "E320": "an FP8 weight of a block-scaled checkpoint has no scale tensor (weight_scale_inv)",
    "E321": "an FP8 scale tensor's shape is not its weight's block grid",
    "E322": "block-scaled FP8 weights, but config.json has no quantization_config.weight_block_size",
    "E323": "moe(...): an expert of another architecture or with other MLP shapes than the base",
    "E324": "moe(...): invalid settings (gate, prompts, output, experts_per_token, shared expert)",
    "E326": "stack_layers: the config of an MoE model cannot describe the stacked layer order",
    "E325": "rmm: an input is not a LoRA adapter, the adapters differ in modules or ranks, or an unknown task",
    "E327": "an invalid adapter_config.json (PEFT's types, RE2 patterns) or LoRA factors that do not fit the weight",
    "E328": "a Hugging Face cache ref that does not name a snapshot of its own repository",
    "E331": "extract-lora: NaN or infinite values in a delta or a full-rank tensor (or its SVD fails)",
    "E330": "an invalid FP8 quantization_config.weight_block_size (not two whole numbers in 1..65536)",
    "E329": "a compile-time string or list too large (1 MiB strings; lists 32 deep, 100000 elements)",
    # command line and options
    "E401": "bad override (--set)",
    "E402": "invalid option",
    "E403": "output folder exists",
    "E404": "output path overlaps an input",
    "E405": "a param's value lies outside its declared range",
    "E406": "invalid param range",
    # mergelang verify (an output against its manifest)
    "E420": "no usable output manifest to verify",
    "E421": "an output file differs from its manifest",
    "E422": "an input differs from what the merge read",
    "E423": "a single-file output (-o FILE.safetensors) for a recipe with several outputs or an adapter",
    # runtime
    "E501": "runtime check failed",
    "E502": "cannot write output",
    # ecosystem: mergekit import, explain, vocabularies
    "E701": "cannot read or parse a mergekit config",
    "E702": "invalid mergekit config",
    "E703": "unknown mergekit merge_method",
    "E704": "mergekit feature not supported by the importer",
    "E705": "missing or invalid mergekit parameter",
    "E706": "LoRA adapter reference in a mergekit config whose adapter is not local",
    "E708": "a mergekit layer_range runs past the model's last layer",
    "E709": "the models' config.json name different architectures (option allow_crimes / --allow-crimes)",
    "E710": "a mergekit-moe config mergekit refuses: every expert has the same prompts",
    "E711": "a mergekit-evolve genome the importer cannot translate",
    "E712": "mergekit-evolve tasks or evaluation settings that cannot be written as a tune objective",
    "E707": "cannot render a graph (Graphviz missing or failed)",
    "E503": "NaN or infinite values in an output tensor",
    "E504": "cannot resume: the work folder is from a different run",
    "E505": "cannot resume: the work folder is unusable",
    "E506": "the finished output failed verification",
    "E507": "another run is writing to the same output",
    "E508": "an input file shrank or changed during the merge (truncated while mapped: no SIGBUS)",
    # alignment (align)
    "E601": "align needs models",
    "E602": "unknown alignment method",
    "E603": "no permutation spec fits the model",
    "E604": "models to align differ in shape",
    "E605": "invalid custom permutation group",
    "E606": "invalid soft-alignment `reg` (negative, not a number, or without method = \"ot\")",
    "E801": "--executor ray without Ray installed",
    "E802": "a Ray worker cannot run the recipe (inputs it cannot read, a different plan)",
    "E803": "--device cuda on a Ray cluster without GPUs",
    "E804": "cannot connect to the Ray cluster",
    "E805": "the Ray run failed after retries",
    "E901": "a param cannot be tuned or learned (undeclared, not numbers, no range), or nothing to tune / learn",
    "E902": "a bad tune / learn setting (sampler, direction, storage, optimizer)",
    "E903": "the objective or loss returned the wrong kind of value, or there is nothing to write",
    "E904": "tune needs optuna (or cmaes) which is not installed",
    "E905": "an objective, loss or data file (FILE.py:NAME) cannot be loaded",
    "E906": "a learn param is read at compile time (a guard, an if, a count) or by a model-wide statistic",
    "E960": "a model for stats / a data objective cannot be loaded by transformers (no config.json, unknown architecture, no tokenizer)",
    "E961": "data cannot be read (missing file, unknown format, a bad .jsonl line, no text field, no examples)",
    "E962": "a datasets folder needs the `datasets` package, which is not installed",
    "E963": "the model cannot give the statistic or objective (no linear layer, no logits, a classifier without labels, not a causal LM)",
    "E964": "lm-eval objectives need lm-evaluation-harness, which is not installed",
    "E965": "a bad stats setting (kind, batch size, lengths, several passes over one-shot batches)",
    "E966": "a bad data objective (perplexity: / lm-eval: without data or tasks, an unknown task, a state that misses weights)",
    "E967": "align by activations / stats --kind correlation: a bad setting (by, stats missing or not a model, no groups for the models, models that differ)",
    "E968": "align's correlation stats do not fit (not a correlation sidecar, a group missing or of another size, a tensor missing, the models swapped)",
    "E969": "stats --module: the torch module cannot be built, does not fit the checkpoint, or has no batch data",
    "E970": "stats: the model's forward pass fails on the data (any kind), or correlation activations are not finite",
    "E907": "the loss or the data function raised, or called sys.exit",
    "E908": "the loss (or a learned param) became NaN or infinite: learning stopped",
    "E950": "inspect: no model to compare with the base",
    "E951": "inspect: a model's tensor differs in shape from the base's",
    "E952": "inspect: the device is not available (--device cuda without a GPU)",
    "E953": "inspect / run --report: html or png plots need matplotlib, which is not installed",
    "E955": "verify FILE.safetensors: the single file does not record the shard layout its manifest's digests cover",
    # warnings
    "W001": "rule never matches",
    "W002": "integer or bool tensor passed through",
    "W003": "function shadows a standard library method",
    "W004": "the output's reference model has no config.json",
    "W005": "the recipe runs Python code (plugins)",
    "W006": "a plugin file declares no method",
    "W101": "mergekit key not translated",
    "W102": "mergekit parameter has no effect in mergelang",
    "W103": "mergekit model is not a local path (nor in the local Hugging Face cache)",
    "W120": "a mergekit-moe config whose experts are all the same model",
    "W112": "a mergekit-evolve evaluation setting not translated",
    "W113": "a mergekit-evolve genome searched in other coordinates than mergekit's",
    "W104": "vocabulary tensors resized (option resize_vocab)",
    "W105": "a model's tokenizer cannot be read for tokenizer_source (its vocabulary is assumed to be the base's)",
    "W109": "a model's config.json disagrees with its tensors on the layer or expert count",
    "W125": "NaN or infinite values in an input tensor (option nan_check = \"warn\")",
    "W108": "low_rank's rank is more than min(rows, cols) of the delta: clamped",
    "W107": "block-scaled FP8 models merged with others: all dequantized, the output takes the reference's format",
    "W106": "the loss does not depend on a learn param (zero gradient): it keeps its value",
    "W145": "the Gram matrices exceed --memory-budget: computed in several passes over the data",
    "W146": "examples longer than --seq-len tokens were truncated",
    "W147": "stats --kind correlation: a permutation group has no activation (no linear layer reads or writes it): align leaves it in place",
    "W148": "align(by = \"activations\"): the correlation statistics were computed for other model folders than the ones aligned",
    "W110": "the objective called sys.exit: those trials failed and the study went on",
    "W111": "rmm --basis is more than the adapters can use: clamped",
    "W140": "inspect: a model lacks some of the base's tensors (left out of the report)",
    "W141": "inspect: a model has tensors the base has not (not inspected)",
}
