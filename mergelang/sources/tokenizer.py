"""The output tokenizer (`option tokenizer_source`), as mergekit's `tokenizer_source` /
`tokenizer:` settings: every model's vocabulary tensors (embeddings, lm_head: rows indexed by
token id) are mapped by token to the output vocabulary before merging.

- "base": the `merge from` model's tokenizer, without tokens whose id is past its config's
  `vocab_size` (mergekit's stripped tokenizer). Models padded past their tokenizer (Qwen) lose the
  padding rows; `pad_to_multiple_of` pads again, with the mean row.
- "union": the base tokenizer plus every other model's tokens (ids < its vocab_size) it lacks,
  in model order, then their added (special) tokens; built with the `tokenizers` library.
- a model's name: that model's tokenizer, as stored.

A row for a token a model lacks (mergekit's `assign_embedding_sources`): the one model that has
it; zero if none has it; the base model's row if the base has it; else the mean over the models
that have it. Rows added by `pad_to_multiple_of`: each model's mean row. The output's tokenizer
files are the chosen tokenizer's, config.json's `vocab_size` the new row count, and
`chat_template` (a Jinja string, or "auto": the models' most common) is written as
chat_template.jinja (as transformers saves it). Only fast tokenizers (tokenizer.json) can be read; a model without one
is assumed to share the base's vocabulary (mergekit does the same, with a warning: W105).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from mergelang.diagnostics import Diagnostics, error, warning
from mergelang.errors import CheckpointError
from mergelang.io.checkpoint import ModelSource, TensorInfo
from mergelang.io.inputs import confined, model_root
from mergelang.io.package import TOKENIZER_FILES  # noqa: F401  (here too)
from mergelang.io.textfile import read_json, read_text
from mergelang.sources.vocab import is_vocab_tensor

if TYPE_CHECKING:
    import torch


class TokenizerError(Exception):
    pass


def _tokenizer_json(src: ModelSource, follow: bool = False) -> Path | None:
    """The model's tokenizer.json, resolved inside its folder (or cache repository: E314 for a
    link leaving it, as for every model file, io/inputs.py), or None."""
    f = Path(src.folder) / "tokenizer.json" if src.folder is not None else None
    if f is None or not f.is_file():
        return None
    try:
        return confined(f, model_root(Path(src.folder)), follow, "tokenizer file")  # type: ignore[arg-type]
    except CheckpointError as e:
        raise _Refused(e) from None


class _Refused(Exception):
    """A tokenizer file refused by the model-folder rule (its CheckpointError: E314)."""

    def __init__(self, exc: CheckpointError):
        super().__init__(exc.message)
        self.exc = exc


def vocab_size(src: ModelSource, rows: int | None) -> int | None:
    cfg = src.config() or {}
    v = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return v if isinstance(v, int) and not isinstance(v, bool) else rows


def _vocab_rows(src: ModelSource) -> int | None:
    rows = [i.shape[0] for n, i in src.tensors().items() if is_vocab_tensor(n) and len(i.shape) >= 1]
    return max(rows) if rows else None


def _load(path: Path) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - a dependency
        raise TokenizerError("the `tokenizers` package is needed for tokenizer_source") from e
    try:
        return Tokenizer.from_str(read_text(path))
    except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
        raise TokenizerError(f"cannot read {path}: {e}") from None


def stripped(path: Path, size: int | None) -> Any:
    """The tokenizer without tokens whose id is >= `size` (mergekit's get_stripped_tokenizer)."""
    tok = _load(path)
    vocab = tok.get_vocab(with_added_tokens=True)
    unused = {t for t, i in vocab.items() if size is not None and i >= size}
    if not unused:
        return tok
    d = json.loads(tok.to_str())
    if d["model"]["type"] != "BPE":
        raise TokenizerError(f"{path} has tokens past vocab_size {size} and is a "
                             f"{d['model']['type']} tokenizer; only BPE ones can be stripped")
    d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < size]
    for t in unused:
        d["model"]["vocab"].pop(t, None)
    d["model"]["merges"] = [m for m in d["model"]["merges"]
                            if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(d))


def union(base: Any, others: list[tuple[Any, int | None]]) -> Any:
    """mergekit's build_union_tokenizer: the base's tokens, then the other tokenizers' tokens it
    lacks (ids below each one's vocab_size), then their added tokens."""
    from tokenizers import AddedToken

    added_out: dict[str, Any] = {}
    plain: dict[str, None] = {}
    for tok, size in [(base, None), *others]:
        decoder = tok.get_added_tokens_decoder()
        added = {a.content for a in decoder.values()}
        for t, i in sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]):
            if (size is None or i < size) and t not in added:
                plain.setdefault(t)
        for i, a in sorted(decoder.items()):
            if size is None or i < size:
                added_out.setdefault(a.content, a)
    base_vocab = base.get_vocab(with_added_tokens=True)
    out = type(base).from_str(base.to_str())
    for t in plain:
        if t not in added_out and t not in base_vocab:
            out.add_tokens([t])
    for a in added_out.values():
        if a.content not in out.get_vocab(with_added_tokens=True):
            out.add_tokens([AddedToken(a.content, single_word=a.single_word, lstrip=a.lstrip,
                                       rstrip=a.rstrip, normalized=a.normalized, special=a.special)])
    return out


class VocabTable:
    """The output vocabulary and, per model, the source row of each output row (-1: missing);
    builds every model's mapped tensor of one name at once (each input read once) and hands
    them out."""

    def __init__(self, models: dict[str, ModelSource], base: str, vocab: dict[str, int], size: int,
                 vocabs: dict[str, dict[str, int] | None]):
        import numpy as np

        self.models, self.base, self.size, self.n = models, base, size, len(vocab)
        self.perm: dict[str, Any] = {}
        for label, src in models.items():
            mine = vocabs.get(label) or vocabs[base] or {}
            limit = vocab_size(src, _vocab_rows(src)) or 0
            p = np.full(self.n, -1, dtype=np.int64)
            for t, i in vocab.items():
                j = mine.get(t, -1)
                p[i] = j if 0 <= j < limit else -1
            self.perm[label] = p
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def tensor(self, name: str, label: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self._build(name)
        got = self._cache[name].pop(label)
        if not self._cache[name]:
            del self._cache[name]
        return got

    def _build(self, name: str) -> dict[str, torch.Tensor]:
        import torch

        have = {k: m for k, m in self.models.items() if name in m.tensors()}
        old = {k: m.load_as(name, torch.float32) for k, m in have.items()}
        perm = {k: torch.from_numpy(self.perm[k]) for k in have}
        present = torch.stack([perm[k] >= 0 for k in have])  # models x rows
        count = present.sum(0)
        shape = next(iter(old.values())).shape[1:]
        default = torch.zeros((self.n, *shape))
        missing = torch.nonzero(count < len(have)).flatten().tolist()
        keys = list(have)
        for j in missing:  # few rows (tokens some model lacks): mergekit's default sources
            rows = [old[k][perm[k][j]] for k in keys if perm[k][j] >= 0]
            if len(rows) == 1:
                default[j] = rows[0]
            elif rows and self.base in have and perm[self.base][j] >= 0:
                default[j] = old[self.base][perm[self.base][j]]
            elif rows:  # summed in model order, then divided (as mergekit)
                acc = torch.zeros(shape)
                for r in rows:
                    acc = acc + r
                default[j] = acc / len(rows)
        out = {}
        for k in keys:
            new = torch.zeros((self.size, *shape))
            p = perm[k]
            ok = p >= 0
            new[: self.n][ok] = old[k][p[ok]]
            new[: self.n][~ok] = default[~ok]
            if self.size > self.n:
                new[self.n:] = new[: self.n].mean(0)
            out[k] = new
        return out


class RetokenizedSource(ModelSource):
    """A model whose vocabulary tensors are mapped to the output vocabulary."""

    def __init__(self, inner: ModelSource, label: str, table: VocabTable, names: set[str],
                 files: dict[str, str | Path] | None = None):
        self.inner, self.label, self.table, self.names = inner, label, table, names
        self.folder = inner.folder
        self.block_output = inner.block_output
        self.files = files
        self._table = {n: (TensorInfo(n, (table.size, *i.shape[1:]), i.dtype, i.file, i.begin, i.end)
                           if n in names else i) for n, i in inner.tensors().items()}

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._table

    def load(self, name: str) -> torch.Tensor:
        if name in self.names:
            return self.table.tensor(name, self.label)
        return self.inner.load(name)

    def load_as(self, name: str, dtype: Any = None, *, view: bool = False) -> torch.Tensor:
        if name in self.names:
            t = self.table.tensor(name, self.label)
            return t if dtype is None else t.to(dtype)
        return self.inner.load_as(name, dtype, view=view)

    def load_rows(self, name: str, dtype: Any, start: int, stop: int, *, view: bool = False):
        if name in self.names:
            return self.load_as(name, dtype)[start:stop].clone()
        return self.inner.load_rows(name, dtype, start, stop, view=view)

    def input_paths(self) -> list[Path]:
        return self.inner.input_paths()

    def close(self) -> None:
        self.inner.close()

    def config(self) -> dict | None:
        cfg = self.inner.config()
        return None if cfg is None else {**cfg, **self.config_patch()}

    def config_patch(self) -> dict[str, Any]:
        return {**(self.inner.config_patch() or {}), "vocab_size": self.table.size}

    def stored_block_scale(self, name: str) -> tuple[str, tuple[int, int], float] | None:
        return self.inner.stored_block_scale(name)  # read remapped (block_scale: None), stored as is

    @property
    def block_scaled(self) -> bool:
        return self.inner.block_scaled

    def tokenizer_files(self) -> dict[str, str | Path] | None:
        return self.files


def retokenize_models(models: dict[str, ModelSource | None], reference: str, source: str,
                      pad: int | None, chat_template: str | None, diags: Diagnostics,
                      span: Any = None, follow: bool = False) -> dict[str, ModelSource | None]:
    """Every model with its vocabulary tensors mapped to the output tokenizer's vocabulary
    (`follow`: --follow-symlinks, tokenizer files may link out of their model folders)."""
    ref = models.get(reference)
    live = {k: m for k, m in models.items() if m is not None and m.block_output is None}
    if ref is None or reference not in live:
        return models
    if source not in ("base", "union") and source not in live:
        diags.add(error("E318", f"tokenizer_source {source!r} is neither \"base\", \"union\" nor "
                        "a model of the recipe", span, "models: " + ", ".join(live)))
        return models
    try:
        vocabs: dict[str, dict[str, int] | None] = {}
        toks: dict[str, Any] = {}
        for label, m in live.items():
            path = _tokenizer_json(m, follow)
            if path is None:
                if label in (reference, source):
                    raise TokenizerError(f"model `{label}` has no tokenizer.json (only fast "
                                         "tokenizers can be read)")
                diags.add(warning("W105", f"model `{label}` has no tokenizer.json; its vocabulary "
                                  f"is assumed to be `{reference}`'s (as mergekit does)", span))
                vocabs[label] = None
                continue
            size = vocab_size(m, _vocab_rows(m))
            toks[label] = stripped(path, size) if label == reference else _load(path)
            vocabs[label] = toks[label].get_vocab(with_added_tokens=True)
        if source == "base":
            out_tok = toks[reference]
        elif source == "union":
            out_tok = union(toks[reference], [(toks[k], vocab_size(live[k], _vocab_rows(live[k])))
                                               for k in toks if k != reference])
        else:
            out_tok = toks[source]
    except TokenizerError as e:
        diags.add(error("E318", f"tokenizer_source {source!r}: {e}", span))
        return models
    except _Refused as e:
        diags.add(error(e.exc.code, f"tokenizer_source {source!r}: {e.exc.message}", span, e.exc.help))
        return models
    vocab = out_tok.get_vocab(with_added_tokens=True)
    size = len(vocab)
    if pad and size % pad:
        size = (size // pad + 1) * pad
    files = _files(out_tok, live, reference, source, chat_template, diags, span, follow)
    table = VocabTable(live, reference, vocab, size, vocabs)
    out: dict[str, ModelSource | None] = {}
    for label, m in models.items():
        if label not in live:
            out[label] = m
            continue
        rows = _vocab_rows(m)
        names = {n for n, i in m.tensors().items() if is_vocab_tensor(n) and i.shape and i.shape[0] == rows}
        out[label] = RetokenizedSource(m, label, table, names, files if label == reference else None)
    return out


def _files(tok: Any, live: dict[str, ModelSource], reference: str, source: str,
           chat_template: str | None, diags: Diagnostics, span: Any,
           follow: bool = False) -> dict[str, str | Path]:
    """The output's tokenizer files: the chosen model's (union: tokenizer.json rebuilt, the
    base's other files), with `chat_template` set in tokenizer_config.json."""
    donor = live[reference if source in ("base", "union") else source]
    folder = Path(donor.folder) if donor.folder is not None else None
    files: dict[str, str | Path] = {}
    if folder is not None:  # checked as every copied file is (links confined, JSON parses)
        from mergelang.io.checkpoint import CheckpointError
        from mergelang.io.inputs import RECIPE_FILENAME, reference_files

        try:
            found = reference_files(folder, RECIPE_FILENAME, follow)
        except (CheckpointError, OSError) as e:
            diags.add(error("E318", f"cannot copy the tokenizer files of {folder}: {e}", span))
            return files
        files.update({k: v for k, v in found.items() if k in TOKENIZER_FILES})
    if source in ("base", "union"):  # stripped or extended: written from the library's model
        files["tokenizer.json"] = tok.to_str(pretty=True)
    if chat_template:
        template = chat_template
        if chat_template == "auto":
            found = [t for t in (_template(m, follow) for m in live.values()) if t]
            if not found:
                diags.add(warning("W105", "chat_template \"auto\": no model has a chat template",
                                  span))
                return files
            template = Counter(found).most_common(1)[0][0]
        if isinstance(files.get("tokenizer_config.json"), Path):  # one template: the file's
            cfg = read_json(Path(files["tokenizer_config.json"]), obj=True)
            if cfg.pop("chat_template", None) is not None:
                files["tokenizer_config.json"] = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
        files["chat_template.jinja"] = template
    return files


def _template(m: ModelSource, follow: bool = False) -> str | None:
    """The model's chat template (chat_template.jinja, else tokenizer_config.json's), read only
    from inside its folder (a file linking out of it counts as absent)."""
    if m.folder is None:
        return None
    f = Path(m.folder)
    root = model_root(f)
    try:
        if (f / "chat_template.jinja").is_file():
            return read_text(confined(f / "chat_template.jinja", root, follow))
        cfg = read_json(confined(f / "tokenizer_config.json", root, follow), obj=True)
        t = cfg.get("chat_template")
    except (OSError, ValueError, CheckpointError):
        return None
    return t if isinstance(t, str) else None
