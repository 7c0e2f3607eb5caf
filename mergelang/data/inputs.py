"""Models and data for the data-driven tools (`mergelang stats`, the `perplexity` objective).

Models: a folder (or `hf:ORG/NAME`, local cache only) loadable by transformers: the class named by
config.json's `architectures` (AutoModel when it names none or an unknown one), float32, eval
mode, never remote code. Its state-dict names are mapped to the checkpoint's own tensor names
(a checkpoint saved from `BertModel` has no `bert.` prefix that `BertForSequenceClassification`
adds), so statistics are written under the names `regmean` / `fisher` will look up.

Data (one example each):
* `FILE.txt`: one example per line (empty lines skipped);
* `FILE.jsonl`: one JSON object per line, its `text` field (or `field=`), and `label` when
  present (a sequence classifier's class, for Fisher);
* a folder written by `datasets`' `save_to_disk` (needs the `datasets` package: E962 without);
* `FILE.py:NAME`: an iterable of batches (dicts of tensors such as `input_ids`,
  `attention_mask`, `labels`, or a tensor of input ids), or a function returning one, as
  `learn --data` loads it.

Texts are tokenised one by one with the model's own tokenizer (its special tokens added),
truncated to `seq_len` tokens, right-padded with zeros into batches; `attention_mask` marks the
real tokens, and padding never counts in any statistic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mergelang.diagnostics import MergelangError, error

if TYPE_CHECKING:
    import torch

DEFAULT_SEQ_LEN = 512
from mergelang.io.textfile import parse_json

#: the largest .txt / .jsonl data file read (read whole, bounded like every text mergelang reads)
MAX_DATA_BYTES = 1024 * 1024 * 1024


def fail(code: str, message: str, help: str | None = None) -> MergelangError:
    return MergelangError(error(code, message, None, help))


@contextlib.contextmanager
def forward_errors() -> Iterator[None]:
    """A model's forward pass on the user's batches: any failure (a batch of the wrong shape or
    dtype, token ids outside the vocabulary) is E970, not an internal error."""
    try:
        yield
    except MergelangError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model on the user's data: one diagnostic
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise fail("E970", f"the model's forward pass failed on the data: {type(exc).__name__}: {first}",
                   "each batch must be the model's inputs (FILE.py:BATCHES: tensors, tuples or dicts; "
                   "token ids inside the vocabulary)") from None


def user_items(source: str, items: Any) -> Iterator[Any]:
    """The items of FILE.py:BATCHES; one that is not iterable, or an iterator that raises, is E961."""
    try:
        it = iter(items)
    except TypeError:
        raise fail("E961", f"--data {source}: a {type(items).__name__} is not an iterable of batches") from None
    k = 0
    while True:
        try:
            b = next(it)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - the user's iterable: one diagnostic
            raise fail("E961", f"--data {source}: producing batch {k} failed: {type(exc).__name__}: {exc}") from None
        yield b
        k += 1


# --------------------------------------------------------------------------------------- models


def model_folder(spec: str | Path) -> Path:
    """The local folder of a model given as a path or `hf:ORG/NAME` (E301 when absent)."""
    from mergelang.errors import CheckpointError
    from mergelang.io.inputs import hf_snapshot, is_hf_id
    from mergelang.io.locate import missing_path_help

    text = str(spec)
    if is_hf_id(text):
        try:
            return hf_snapshot(text)
        except CheckpointError as exc:
            raise fail(exc.code, str(exc), exc.help) from None
    p = Path(text)
    if not p.exists():
        raise fail("E301", f"model {text} does not exist", missing_path_help(p))
    if not p.is_dir() or not (p / "config.json").is_file():
        raise fail("E960", f"model {text} is not a folder with a config.json",
                   "give a Hugging Face model folder (config.json, weights, tokenizer)")
    return p


def model_class(config: Any, want: str = "any") -> Any:
    """The transformers class to build: config.architectures[0] when transformers knows it,
    else AutoModelForCausalLM (`want="causal"`) or AutoModel."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM if want == "causal" else transformers.AutoModel


def load_config(folder: Path) -> Any:
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any config problem: one diagnostic
        raise fail("E960", f"model {folder}: transformers cannot read its config.json: "
                   f"{type(exc).__name__}: {exc}",
                   "the model must be loadable by transformers (no remote code)") from None


@dataclass
class LoadedModel:
    model: Any  # a torch.nn.Module in eval mode, float32
    tokenizer: Any  # None when the folder has none (FILE.py:BATCHES data needs none)
    folder: Path
    #: state-dict name -> the checkpoint's tensor name (only names the checkpoint has)
    names: dict[str, str] = field(default_factory=dict)


def load_model(spec: str | Path, device: Any, want: str = "any", weights: bool = True) -> LoadedModel:
    """The model (weights loaded unless `weights` is false: built from its config), its
    tokenizer and the name map (E960 when transformers cannot build it)."""
    import torch

    folder = model_folder(spec)
    quiet_transformers()
    config = load_config(folder)
    cls = model_class(config, want)
    _config_fits(cls, config, folder, spec)
    try:
        if weights:
            model = cls.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False)
        else:
            model = cls._from_config(config, dtype=torch.float32) if hasattr(cls, "_from_config") \
                else cls.from_config(config)
    except Exception as exc:  # noqa: BLE001
        raise fail("E960", f"model {spec}: transformers cannot load it as {cls.__name__}: "
                   f"{type(exc).__name__}: {exc}",
                   "the model must be loadable by transformers (no remote code)") from None
    model = model.to(device).float().eval()
    return LoadedModel(model, load_tokenizer(folder), folder, name_map(model, folder))


def _config_fits(cls: Any, config: Any, folder: Path, spec: Any) -> None:
    """E960 before any weight is allocated when config.json does not describe the checkpoint
    (a config without sizes builds transformers' default, e.g. a 7B Llama: 28 GB of float32)."""
    import torch
    from mergelang.io.locate import open_model

    try:
        with torch.device("meta"):
            meta = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
        src = open_model("model", folder)
    except Exception:  # noqa: BLE001 - no safetensors to compare with: from_pretrained decides
        return
    try:
        shapes = {n: tuple(i.shape) for n, i in src.tensors().items()}
    finally:
        src.close()
    names = name_map(meta, folder)
    own = meta.state_dict()
    wrong = [(n, c) for n, c in names.items() if tuple(own[n].shape) != shapes[c]]
    if wrong or not names:
        what = (f"`{wrong[0][1]}` is {list(shapes[wrong[0][1]])} in the checkpoint and "
                f"{list(own[wrong[0][0]].shape)} by config.json") if wrong else \
            "none of the model's parameters is in the checkpoint"
        raise fail("E960", f"model {spec}: config.json does not describe its checkpoint: {what}",
                   "give the config.json the model was saved with (hidden sizes, layer counts)")


def quiet_transformers() -> None:
    """No "Loading weights" bars or load reports from transformers (mergelang shows its own);
    E960 without transformers."""
    try:
        from transformers.utils import logging
    except ImportError:
        raise fail("E960", "statistics and objectives on data need transformers, which is not "
                   "installed", 'pip install "mergelang[data]"') from None

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_tokenizer(folder: Path) -> Any:
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                 "vocab.txt", "tokenizer.model")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise fail("E960", f"model {folder}: transformers cannot load its tokenizer: "
                   f"{type(exc).__name__}: {exc}") from None


def checkpoint_names(folder: Path) -> set[str]:
    from mergelang.io.locate import open_model

    try:
        src = open_model("model", folder)
    except Exception:  # noqa: BLE001 - pickle-only folders etc.: the state dict's own names
        return set()
    try:
        return set(src.tensors())
    finally:
        src.close()


def name_map(model: Any, folder: Path) -> dict[str, str]:
    """state-dict name -> checkpoint name, adding or removing the model's `base_model_prefix`
    where the checkpoint was saved from another head class. Without readable safetensors, every
    state-dict name maps to itself."""
    ckpt = checkpoint_names(folder)
    own = list(model.state_dict().keys())
    if not ckpt:
        return {n: n for n in own}
    prefix = (getattr(model, "base_model_prefix", "") or "") + "."
    out = {}
    for n in own:
        for cand in (n, n.removeprefix(prefix) if n.startswith(prefix) else None, prefix + n):
            if cand is not None and cand in ckpt:
                out[n] = cand
                break
    return out


# ----------------------------------------------------------------------------------------- data


@dataclass
class Data:
    """Examples as texts (with optional labels), or batches from FILE.py:NAME."""

    source: str
    digest: str  # sha256 of what was read (the file's bytes, or the batches' tensors)
    texts: list[str] | None = None
    labels: list[Any] | None = None
    batches: Any = None  # an iterable of batches (FILE.py:NAME)


def load_data(spec: str | Path, text_field: str = "text") -> Data:
    text = str(spec)
    path_text, sep, name = text.rpartition(":")
    if sep and path_text.endswith(".py") and name.isidentifier():
        from mergelang.search.objectives import load_value

        value = load_value(text, "data")
        if callable(value):
            value = value()
        return Data(text, "", batches=value)
    p = Path(text)
    if not p.exists():
        from mergelang.io.locate import missing_path_help

        raise fail("E961", f"data {text} does not exist", missing_path_help(p))
    if p.is_dir():
        return _dataset_folder(p, text_field)
    try:
        from mergelang.io.textfile import read_bytes

        raw = read_bytes(p, MAX_DATA_BYTES)
        body = raw.decode("utf-8")
    except (OSError, ValueError) as exc:  # not a regular file, too large, not UTF-8
        raise fail("E961", f"data {text}: cannot read it as UTF-8 text: {exc}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if p.suffix == ".txt":
        texts = [ln for ln in body.splitlines() if ln.strip()]
        labels = None
    elif p.suffix == ".jsonl":
        texts, labels = _jsonl(p, body, text_field)
    else:
        raise fail("E961", f"data {text}: unknown format `{p.suffix or p.name}`",
                   "give a .txt (one example per line), a .jsonl (a `text` field), a `datasets` "
                   "folder (save_to_disk) or FILE.py:BATCHES")
    if not texts:
        raise fail("E961", f"data {text} has no examples")
    return Data(text, digest, texts, labels)


def _jsonl(p: Path, body: str, text_field: str) -> tuple[list[str], list[Any] | None]:
    texts: list[str] = []
    labels: list[Any] = []
    for i, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = parse_json(line)
        except ValueError as exc:
            raise fail("E961", f"{p}:{i}: not a JSON object: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
            raise fail("E961", f"{p}:{i}: no text field `{text_field}` (found: {keys})",
                       "choose the field with --field NAME")
        if not obj[text_field].strip():  # an empty text, as a blank line of a .txt: no example
            continue
        texts.append(obj[text_field])
        labels.append(obj.get("label"))
    have = [lab is not None for lab in labels]
    if any(have) and not all(have):
        raise fail("E961", f"{p}: some examples have a `label` and others do not")
    return texts, labels if labels and all(have) else None


def _dataset_folder(p: Path, text_field: str) -> Data:
    try:
        import datasets
    except ImportError:
        raise fail("E962", f"data {p} is a folder: reading a `datasets` folder (save_to_disk) "
                   "needs the `datasets` package, which is not installed",
                   "pip install datasets, or give the data as .txt / .jsonl") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001
        raise fail("E961", f"data {p}: not a folder written by datasets' save_to_disk: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if text_field not in ds.column_names:
        raise fail("E961", f"data {p}: no column `{text_field}` (columns: "
                   f"{', '.join(ds.column_names)})", "choose the column with --field NAME")
    texts = [str(t) for t in ds[text_field]]
    labels = list(ds["label"]) if "label" in ds.column_names else None
    digest = hashlib.sha256(json.dumps([texts, labels]).encode()).hexdigest()
    return Data(str(p), digest, texts, labels)


# -------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    inputs: dict[str, "torch.Tensor"]  # model keyword arguments (on the device)
    mask: "torch.Tensor"  # (B, T) bool: the real tokens
    labels: "torch.Tensor | None"  # classifier labels (B,), or token labels (B, T) with -100
    size: int  # examples


@dataclass
class Counts:
    examples: int = 0
    tokens: int = 0
    truncated: int = 0


def batches(data: Data, tokenizer: Any, device: Any, batch_size: int, seq_len: int = DEFAULT_SEQ_LEN,
            max_examples: int | None = None, counts: Counts | None = None) -> Iterator[Batch]:
    """Batches of at most `batch_size` examples, `max_examples` in all; `counts` is filled in."""
    counts = counts if counts is not None else Counts()
    if data.batches is not None:
        yield from _user_batches(data, device, max_examples, counts)
        return
    if tokenizer is None:
        raise fail("E960", "the model folder has no tokenizer, so text data cannot be tokenised",
                   "copy the tokenizer files into the model folder, or give FILE.py:BATCHES")
    import torch

    texts = data.texts or []
    n = len(texts) if max_examples is None else min(len(texts), max_examples)
    for start in range(0, n, batch_size):
        chunk = texts[start:min(n, start + batch_size)]
        ids = []
        for t in chunk:
            tok = tokenizer(t, add_special_tokens=True)["input_ids"]
            if len(tok) > seq_len:
                counts.truncated += 1
                tok = tok[:seq_len]
            ids.append(tok)
        width = max(1, max(len(t) for t in ids))
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.bool)
        for i, t in enumerate(ids):
            input_ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, :len(t)] = True
        labels = None
        if data.labels is not None:
            labels = torch.tensor(data.labels[start:start + len(chunk)]).to(device)
        counts.examples += len(chunk)
        counts.tokens += int(mask.sum())
        yield Batch({"input_ids": input_ids.to(device), "attention_mask": mask.long().to(device)},
                    mask.to(device), labels, len(chunk))


def _user_batches(data: Data, device: Any, max_examples: int | None, counts: Counts) -> Iterator[Batch]:
    import torch

    digest = hashlib.sha256()
    for k, b in enumerate(user_items(data.source, data.batches)):
        if isinstance(b, torch.Tensor):
            b = {"input_ids": b}
        if not isinstance(b, dict) or not isinstance(b.get("input_ids"), torch.Tensor) \
                or b["input_ids"].dim() != 2:
            raise fail("E961", f"--data {data.source}: batch {k} is not a dict with a 2-D "
                       "`input_ids` tensor (or such a tensor)")
        size = b["input_ids"].shape[0]
        if max_examples is not None:
            size = min(size, max_examples - counts.examples)
            if size <= 0:
                break
            b = {key: v[:size] if isinstance(v, torch.Tensor) else v for key, v in b.items()}
        mask = b.get("attention_mask")
        mask = torch.ones_like(b["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
        for key, v in b.items():
            if isinstance(v, torch.Tensor):
                digest.update(key.encode())
                digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        labels = b.get("labels")
        inputs = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in b.items()
                  if key != "labels"}
        counts.examples += size
        counts.tokens += int(mask.sum())
        yield Batch(inputs, mask.to(device), labels.to(device) if labels is not None else None, size)
    data.digest = digest.hexdigest()
