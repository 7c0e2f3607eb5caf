"""Vocabulary mismatches: models whose embedding / lm_head tensors have a different number of rows
(tokens) than the `merge from` model.

- `improve_diagnostics`: a shape error (E202/E207) on such a tensor gets a note naming every
  model's shape and a help saying how to resolve it.
- `option resize_vocab = true`: every other model's vocabulary tensors are truncated or padded to
  the reference's row count when loaded; padding rows are copied from the reference model, so a
  merge leaves the reference's extra tokens as they are (a task vector is zero there). The
  resized models are reported with W104. Token ids must mean the same in all tokenizers for the
  shared rows; mergelang does not remap tokenizers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import torch

from mergelang.io.checkpoint import ModelSource, TensorInfo
from mergelang.diagnostics import Diagnostic, Diagnostics, warning

VOCAB_RE = re.compile(r"(embed_tokens|embed_in|embed_out|lm_head|wte|word_embeddings|"
                      r"shared|tok_embeddings)")
_TICKS = re.compile(r"`([^`]+)`")
HELP = ("the models have different vocabularies; add `option resize_vocab = true` to truncate or "
        "pad them to the `merge from` model's rows (padding copies its rows), or take this tensor "
        "from one model with a rule such as \"{name}\" => {ref}")


def is_vocab_tensor(name: str) -> bool:
    return bool(VOCAB_RE.search(name))


def vocab_shapes(models: Mapping[str, ModelSource | None], name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for label, m in models.items():
        if m is not None and name in m.tensors():
            out[label] = m.tensors()[name].shape
    return out


def improve_diagnostics(diags: Diagnostics, models: Mapping[str, ModelSource | None],
                        reference: str) -> None:
    """Rewrite E202/E207 errors about vocabulary tensors whose shapes differ between models."""
    items = diags._items  # noqa: SLF001 - same package; replaced in place, keys unchanged
    for i, d in enumerate(items):
        if d.code not in ("E202", "E207"):
            continue
        texts = [d.message] + [t for t, _ in d.notes]
        names = [n for t in texts for n in _TICKS.findall(t) if is_vocab_tensor(n)]
        for name in names:
            shapes = vocab_shapes(models, name)
            if len({s[1:] for s in shapes.values()}) != 1 or len({s[0] for s in shapes.values()}) < 2:
                continue
            listing = ", ".join(f"`{m}` {list(s)}" for m, s in shapes.items())
            items[i] = Diagnostic(d.code, d.message, d.span, HELP.format(name=name, ref=reference),
                                  d.notes + ((f"vocabulary sizes differ for `{name}`: {listing}", None),),
                                  d.severity)
            break


class ResizedVocab(ModelSource):
    """A model whose vocabulary tensors are truncated or padded (from the reference) to `rows`."""

    def __init__(self, inner: ModelSource, reference: ModelSource, rows: dict[str, int]):
        self.inner, self.reference, self.rows = inner, reference, rows
        self.label, self.folder = inner.label, inner.folder
        table = dict(inner.tensors())
        for name, r in rows.items():
            info = table[name]
            table[name] = TensorInfo(info.name, (r, *info.shape[1:]), info.dtype, info.file,
                                     info.begin, info.end)
        self._table = table

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._table

    def load(self, name: str) -> torch.Tensor:
        import torch

        t = self.inner.load(name)
        r = self.rows.get(name)
        if r is None or t.shape[0] == r:
            return t
        if t.shape[0] > r:
            return t[:r].contiguous()
        pad = self.reference.load(name)[t.shape[0]:r].to(t.dtype)
        return torch.cat([t, pad], dim=0)

    def close(self) -> None:
        self.inner.close()

    def config(self) -> dict | None:
        return self.inner.config()

    def stored_block_scale(self, name: str) -> tuple[str, tuple[int, int], float] | None:
        return self.inner.stored_block_scale(name)  # read resized (block_scale: None), stored as is

    @property
    def block_scaled(self) -> bool:
        return self.inner.block_scaled


def resize_models(models: dict[str, ModelSource | None], reference: str,
                  diags: Diagnostics) -> dict[str, ModelSource | None]:
    ref = models.get(reference)
    if ref is None:
        return models
    out: dict[str, ModelSource | None] = {}
    for label, m in models.items():
        if m is None or label == reference:
            out[label] = m
            continue
        rows = {}
        changes = []
        for name, info in ref.tensors().items():
            mine = m.tensors().get(name)
            if mine is None or not is_vocab_tensor(name) or mine.shape == info.shape:
                continue
            if len(mine.shape) == len(info.shape) and mine.shape[1:] == info.shape[1:]:
                rows[name] = info.shape[0]
                verb = "truncated" if mine.shape[0] > info.shape[0] else "padded"
                changes.append(f"`{name}` {list(mine.shape)} {verb} to {list(info.shape)}")
        if rows:
            diags.add(warning("W104", f"model `{label}`: " + "; ".join(changes), None,
                              f"resize_vocab: rows beyond `{reference}`'s vocabulary are dropped, "
                              f"missing rows are copied from `{reference}`"))
            out[label] = ResizedVocab(m, ref, rows)
        else:
            out[label] = m
    return out
