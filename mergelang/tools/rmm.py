"""Reversible model merging for LoRA adapters (RMM; Alipour & Amiri, arXiv 2510.14163).

Instead of one merged adapter, RMM keeps a compact basis from which each task's adapter is
rebuilt by a linear combination. Following the paper's construction: for each module and each
*position* of the low-rank factors — a column of PEFT's lora_A (r x in) or a row of lora_B
(out x r) — the r-dimensional vectors of the n adapters form X = [x_1 ... x_n] (r x n); the
closed-form optimum for k < n basis vectors and per-task coefficients is the truncated SVD,
X ~= U_k (S_k Vh_k): basis U_k (r x k), coefficients S_k Vh_k (k x n), the best rank-k
approximation of X (Eckart-Young). With k >= n the adapters are rebuilt exactly.

Stored (`reversible_merge`): `rmm_model.safetensors` with, per module, `M.lora_A.basis`
(in, r, k), `M.lora_A.coef` (in, k, n), `M.lora_B.basis` (out, r, k), `M.lora_B.coef`
(out, k, n) and each task's other tensors (biases, modules_to_save) as `task{i}/NAME`; and
`rmm_config.json` (tasks, k, r, the adapters' config, each task's reconstruction error
||B'A' - BA||_F / ||BA||_F over all modules). `rebuild` writes task i's PEFT adapter folder.

What the paper's full text adds beyond this (choices of k per layer, its experiments) was not
available offline; this follows its method description (see docs/methods.md, "rmm").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from mergelang.diagnostics import MergelangError, error
from mergelang.errors import CodedError, to_diagnostic

MODEL_FILE = "rmm_model.safetensors"
CONFIG_FILE = "rmm_config.json"


def _read_adapter(folder: Path) -> tuple[dict, dict[str, Any]]:
    """An adapter folder's config and tensors, read by the rule `lora("dir")` reads them with
    (io/adapter.py: files confined to the folder, E314; the config checked, E327)."""
    from safetensors.torch import load_file

    from mergelang.io.adapter import adapter_paths, read_adapter_config

    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise MergelangError(error("E325", f"{folder} is not a PEFT LoRA adapter folder (no "
                                   "adapter_config.json / adapter_model.safetensors)", None,
                                   "write one with `mergelang extract-lora` or peft's save_pretrained"))
    try:
        model, cfg_path = adapter_paths(folder)
        cfg = read_adapter_config(cfg_path)
        tensors = load_file(str(model))
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None
    except Exception as exc:  # noqa: BLE001 - OSError, safetensors' own error for a bad file
        raise MergelangError(error("E325", f"cannot read the adapter in {folder}: {exc}")) from None
    bad = [k for k, v in tensors.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))
           and (v.dim() != 2 or not v.is_floating_point())]
    if bad:
        raise MergelangError(error("E325", f"{folder}: `{bad[0]}` is not a 2-D floating tensor",
                                   None, "lora_A / lora_B weights are (r, in) and (out, r) matrices"))
    for k, a in tensors.items():
        if k.endswith(".lora_A.weight"):
            b = tensors.get(k[: -len("A.weight")] + "B.weight")
            if b is None or b.shape[1] != a.shape[0]:
                got = "no lora_B" if b is None else f"lora_B {list(b.shape)}"
                raise MergelangError(error("E325", f"{folder}: `{k}` is {list(a.shape)} with "
                                           f"{got}", None, "each module needs lora_A (r, in) and "
                                           "lora_B (out, r) of one rank r"))
    return cfg, tensors


def _modules(tensors: dict[str, Any]) -> list[str]:
    return sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))


def _scale(cfg: dict, module: str, r: int) -> float:
    """PEFT's scaling of a module (io/adapter.py: lora_alpha / r, alpha_pattern as PEFT matches
    it, on RE2)."""
    from mergelang.io.adapter import lora_scale

    return lora_scale(cfg, module, r)


def positions_basis(x: "Any", k: int) -> tuple["Any", "Any"]:
    """x: (positions, r, n) -> (basis (positions, r, k), coefficients (positions, k, n)): per
    position the best rank-k approximation of its r x n matrix (float32 SVD)."""
    import torch

    u, s, vh = torch.linalg.svd(x.to(torch.float32), full_matrices=False)
    kk = min(k, s.shape[-1])
    basis = u[..., :kk]
    coef = s[..., :kk, None] * vh[..., :kk, :]
    if kk < k:  # k > min(r, n): pad (zeros) so every module has k basis vectors
        basis = torch.nn.functional.pad(basis, (0, k - kk))
        coef = torch.nn.functional.pad(coef, (0, 0, 0, k - kk))
    return basis.contiguous(), coef.contiguous()


def reversible_merge(adapters: Sequence[str | Path], out: str | Path, basis: int, *,
                     names: Sequence[str] | None = None, force: bool = False,
                     log: Callable[[str], None] = lambda m: None) -> dict:
    """Write the RMM folder for `adapters` (PEFT LoRA folders of one base, the same modules and
    ranks) with `basis` vectors per position; returns its config (with the errors)."""
    import torch

    from mergelang.io.layout import OutputTensor, single_file
    from mergelang.io.writer import CheckpointWriter

    folders = [Path(a) for a in adapters]
    if len(folders) < 2:
        raise MergelangError(error("E325", "rmm needs at least two adapters"))
    if basis < 1:
        raise MergelangError(error("E203", f"--basis must be at least 1, got {basis}"))
    tasks = list(names) if names else [f.name for f in folders]
    if len(tasks) != len(folders) or len(set(tasks)) != len(tasks):
        raise MergelangError(error("E325", "task names must be distinct, one per adapter", None,
                                   "rename the folders or give --name per adapter"))
    read = [_read_adapter(f) for f in folders]
    cfg0, t0 = read[0]
    modules = _same_modules(folders, [t for _, t in read])
    n = len(folders)
    basis = _clamp_basis(basis, t0, modules, n, log)
    outs: list[OutputTensor] = []
    for m in modules:
        r, cin = t0[f"{m}.lora_A.weight"].shape
        cout = t0[f"{m}.lora_B.weight"].shape[0]
        outs += [OutputTensor(f"{m}.lora_A.basis", (cin, r, basis), "float32"),
                 OutputTensor(f"{m}.lora_A.coef", (cin, basis, n), "float32"),
                 OutputTensor(f"{m}.lora_B.basis", (cout, r, basis), "float32"),
                 OutputTensor(f"{m}.lora_B.coef", (cout, basis, n), "float32")]
    extra = {f"task{i}/{k}": v for i, (_, t) in enumerate(read) for k, v in t.items()
             if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))}
    outs += [OutputTensor(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in extra.items()]
    num = [0.0] * n
    den = [0.0] * n
    protected = [p for f in folders for p in (f, f / "adapter_model.safetensors")]
    try:
        with CheckpointWriter(out, single_file(outs, MODEL_FILE), force=force, protected=protected) as w:
            for m in modules:
                # the scale folded into B, so that coefficients combine whole deltas
                a = torch.stack([t[f"{m}.lora_A.weight"].float() for _, t in read])          # n, r, in
                b = torch.stack([t[f"{m}.lora_B.weight"].float() * _scale(c, m, a.shape[1])
                                 for c, t in read])                                          # n, out, r
                ab, ac = positions_basis(a.permute(2, 1, 0), basis)    # positions = columns of A
                bb, bc = positions_basis(b.permute(1, 2, 0), basis)    # positions = rows of B
                for name, val in ((f"{m}.lora_A.basis", ab), (f"{m}.lora_A.coef", ac),
                                  (f"{m}.lora_B.basis", bb), (f"{m}.lora_B.coef", bc)):
                    w.write(name, val)
                ra, rb = _rebuild_factors(ab, ac, bb, bc)
                for i in range(n):
                    want = b[i] @ a[i]
                    num[i] += float((rb[i] @ ra[i] - want).pow(2).sum())
                    den[i] += float(want.pow(2).sum())
            for k, v in extra.items():
                w.write(k, v.contiguous())
            errors = {t: (num[i] / den[i]) ** 0.5 if den[i] else 0.0 for i, t in enumerate(tasks)}
            config = {"method": "rmm", "tasks": tasks, "basis": basis, "adapter_config": cfg0,
                      "adapter_configs": [c for c, _ in read], "sources": [str(f) for f in folders],
                      "relative_error": errors}
            for t, e in errors.items():
                log(f"{t}: relative reconstruction error {e:.3g}")
            w.finish(extra_files={CONFIG_FILE: json.dumps(config, indent=2) + "\n"})
            return config
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None


def _same_modules(folders: list[Path], tensors: list[dict[str, Any]]) -> list[str]:
    """The modules the adapters adapt: the same in each, with the same shapes (else E325)."""
    t0 = tensors[0]
    modules = _modules(t0)
    if not modules:
        raise MergelangError(error("E325", f"{folders[0]} has no lora_A / lora_B weights"))
    for f, t in zip(folders[1:], tensors[1:]):
        if _modules(t) != modules:
            raise MergelangError(error("E325", f"{f} adapts other modules than {folders[0]}", None,
                                       "RMM combines adapters of the same modules (one base, one target list)"))
        for m in modules:
            for part in ("lora_A", "lora_B"):
                a, b = t[f"{m}.{part}.weight"].shape, t0[f"{m}.{part}.weight"].shape
                if a != b:
                    raise MergelangError(error("E325", f"`{m}.{part}` is {list(a)} in {f} and {list(b)} "
                                               f"in {folders[0]}", None, "every adapter needs the same rank per module"))
    return modules


def _clamp_basis(basis: int, t0: dict[str, Any], modules: list[str], n: int,
                 log: Callable[[str], None]) -> int:
    """`basis`, at most the number of basis vectors n adapters of these ranks can use (W111)."""
    most = max(min(t0[f"{m}.lora_A.weight"].shape[0], n) for m in modules)
    if basis > most:  # more vectors than the r x n matrices have rank: zeros, never used
        from mergelang.diagnostics import warning

        log(warning("W111", f"--basis {basis} is more than the {most} basis vectors these adapters "
                    f"can use (rank {max(t0[f'{m}.lora_A.weight'].shape[0] for m in modules)}, {n} "
                    f"adapters): clamped to {most}", None,
                    f"with --basis {most} every adapter is rebuilt exactly").render())
        basis = most
    return basis


def _rebuild_factors(ab: Any, ac: Any, bb: Any, bc: Any) -> tuple[Any, Any]:
    """(A per task (n, r, in), B per task (n, out, r)) from the basis and coefficients."""
    a = (ab @ ac).permute(2, 1, 0)      # (in, r, n) -> (n, r, in)
    b = (bb @ bc).permute(2, 0, 1)      # (out, r, n) -> (n, out, r)
    return a, b


def rebuild(folder: str | Path, task: str | int, out: str | Path, *, force: bool = False) -> Path:
    """Write task `task`'s PEFT adapter (name or index) rebuilt from an RMM folder."""
    import torch

    from mergelang.io.adapter import ADAPTER_FILE
    from mergelang.io.layout import OutputTensor, single_file
    from mergelang.io.writer import CheckpointWriter

    folder = Path(folder)
    config, stored = _read_rmm(folder)
    tasks = config["tasks"]
    i = tasks.index(task) if task in tasks else (
        int(task) if str(task).isdigit() and str(task).isascii() and len(str(task)) < 10 else -1)
    if not 0 <= i < len(tasks):
        raise MergelangError(error("E325", f"no task {task!r} in {folder}", None,
                                   f"tasks: {', '.join(tasks)} (or an index 0..{len(tasks) - 1})"))
    cfg = dict(config["adapter_configs"][i])
    tensors: dict[str, torch.Tensor] = {}
    for name in stored:
        if name.endswith(".lora_A.basis"):
            m = name[: -len(".lora_A.basis")]
            a, b = _rebuild_factors(stored[f"{m}.lora_A.basis"], stored[f"{m}.lora_A.coef"],
                                    stored[f"{m}.lora_B.basis"], stored[f"{m}.lora_B.coef"])
            r = a.shape[1]
            # the scale was folded into B: undo it so the task's own config applies
            tensors[f"{m}.lora_A.weight"] = a[i].contiguous()
            tensors[f"{m}.lora_B.weight"] = (b[i] / _scale(cfg, m, r)).contiguous()
        elif name.startswith(f"task{i}/"):
            tensors[name.split("/", 1)[1]] = stored[name]
    outs = [OutputTensor(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()]
    try:
        with CheckpointWriter(out, single_file(outs, ADAPTER_FILE), force=force,
                              protected=[folder, folder / MODEL_FILE]) as w:
            for k, v in tensors.items():
                w.write(k, v)
            return w.finish(extra_files={"adapter_config.json": json.dumps(cfg, indent=4) + "\n"})
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None


def _read_rmm(folder: Path) -> tuple[dict, dict[str, Any]]:
    """An RMM folder's config and tensors, checked (E325 / E327 / E314): the files inside the
    folder, read with the bounded readers; `tasks` distinct names, one adapter config each
    (checked as adapter_config.json is); per module the four basis / coefficient tensors, of
    consistent shapes with one coefficient column per task."""
    from safetensors.torch import load_file

    from mergelang.io.adapter import check_adapter_config
    from mergelang.io.inputs import confined, model_root
    from mergelang.io.textfile import read_json

    def bad(what: str) -> MergelangError:
        return MergelangError(error("E325", f"{folder} is not an RMM folder: {what}", None,
                                    "write one with `mergelang rmm`"))

    try:
        root = model_root(folder)
        config = read_json(confined(folder / CONFIG_FILE, root, False, "RMM config"), obj=True)
        stored = load_file(str(confined(folder / MODEL_FILE, root, False, "RMM file")))
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None
    except Exception as exc:  # noqa: BLE001 - OSError, TextFileError, safetensors' own error
        raise bad(str(exc) or type(exc).__name__) from None
    tasks, cfgs = config.get("tasks"), config.get("adapter_configs")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks) \
            or len(set(tasks)) != len(tasks):
        raise bad(f"{CONFIG_FILE}'s `tasks` is not a list of distinct names")
    if not isinstance(cfgs, list) or len(cfgs) != len(tasks):
        raise bad(f"{CONFIG_FILE}'s `adapter_configs` is not a list of one config per task")
    try:
        for c in cfgs:
            check_adapter_config(c, folder / CONFIG_FILE)
    except CodedError as exc:
        raise MergelangError(to_diagnostic(exc)) from None
    n = len(tasks)
    for name, t in stored.items():
        if not name.endswith(".lora_A.basis"):
            continue
        m = name[: -len(".lora_A.basis")]
        parts = [stored.get(f"{m}.{p}") for p in ("lora_A.basis", "lora_A.coef", "lora_B.basis",
                                                    "lora_B.coef")]
        if any(p is None or p.dim() != 3 or not p.is_floating_point() for p in parts):
            raise bad(f"module `{m}` lacks a 3-D floating basis or coefficient tensor")
        ab, ac, bb, bc = (tuple(p.shape) for p in parts)
        if not (ab[0] == ac[0] and bb[0] == bc[0] and ab[1] == bb[1] and ab[2] == ac[1] == bb[2] == bc[1]
                and ac[2] == bc[2] == n):
            raise bad(f"module `{m}`'s basis and coefficients have inconsistent shapes "
                      f"{list(ab)}, {list(ac)}, {list(bb)}, {list(bc)} for {n} tasks")
    return config, stored
