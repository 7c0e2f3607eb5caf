"""`mergelang verify OUT`: check an output folder against its manifest (io/verify.py): its files
are the ones written (digests), and the inputs on this machine are still those the merge read.
Exit 0 when everything matches, 1 with a diagnostic otherwise (E420 no usable manifest, E421 an
output file differs, E422 an input differs). A single-file output (`run -o FILE.safetensors`)
carries its manifest and its shard layout in its metadata: its shard digests are recomputed from
the file (E955: a file without the layout, from an older mergelang)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mergelang.commands.common import cli_guard
from mergelang.diagnostics import Diagnostic, MergelangError, error


def _manifest(folder: Path) -> dict[str, Any]:
    from mergelang.io.outguard import MANIFEST_FORMAT, MANIFEST_NAME

    path = folder / MANIFEST_NAME
    try:
        from mergelang.io.textfile import read_json

        data = read_json(path, 16 * 1024 * 1024)
    except (OSError, ValueError, RecursionError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise MergelangError(error("E420", f"{folder} has no readable {MANIFEST_NAME} ({why})", None,
                                   "verify checks a folder written by `mergelang run` (or tune -o, "
                                   "learn -o, extract-lora)")) from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise MergelangError(error("E420", f"{path} is not a mergelang output manifest", None,
                                   "verify checks a folder written by mergelang"))
    return data


def _single_file(path: Path) -> tuple[dict[str, Any], Any]:
    """The manifest and the recorded shard layout (None: not recorded) of a single-file output
    (`run -o FILE.safetensors`, io/singlefile.py)."""
    import json

    from mergelang.io.outguard import MANIFEST_FORMAT
    from mergelang.io.singlefile import MANIFEST_KEY, SHARDS_KEY, metadata_of

    meta = metadata_of(path)
    if meta is None:
        raise MergelangError(error("E420", f"{path} is not a readable safetensors file (truncated, "
                                   "or its header edited)", None,
                                   "verify checks a file written by `mergelang run -o FILE.safetensors`"))
    try:
        data = json.loads(meta[MANIFEST_KEY])
        layout = json.loads(meta[SHARDS_KEY]) if SHARDS_KEY in meta else None
    except (KeyError, ValueError, RecursionError):
        data = layout = None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise MergelangError(error("E420", f"{path} carries no mergelang manifest in its metadata", None,
                                   "verify checks a file written by `mergelang run -o FILE.safetensors`"))
    return data, layout if isinstance(layout, dict) else None


def _single_outputs(path: Path, data: dict[str, Any], layout: Any, say: Any) -> list[Diagnostic]:
    from mergelang.io.verify import check_single_file

    if layout is None:
        return [error("E955", f"{path}: its tensor data cannot be checked: the file does not record "
                      "the shard layout its manifest's digests cover (written by an older mergelang)",
                      None, "rerun the merge (the recipe is in its metadata) to rewrite it; its "
                      "inputs are still checked")]
    problems, notes = check_single_file(path, data, layout)
    for p in problems:
        say(f"  output  DIFFERS  {p}")
    for note in notes:
        say(f"  output  note     {note}")
    if problems:
        return [error("E421", f"{path}: {len(problems)} of its parts differ from the manifest", None,
                      "the file was changed after mergelang wrote it: rerun the merge (the recipe "
                      "is in its metadata, mergelang_recipe) to rebuild it")]
    say(f"{path}: outputs ok (the tensors of {len(layout)} shard{'s' if len(layout) != 1 else ''} match their digests)")
    return []


def verify_folder(folder: Path, inputs: bool, quick: bool, say: Any) -> list[Diagnostic]:
    """The report (through `say`) and the errors for one output folder (and its named outputs),
    or for a single-file output (FILE.safetensors)."""
    from mergelang.io.verify import check_outputs

    errors: list[Diagnostic] = []
    if not folder.exists():
        raise MergelangError(error("E420", f"{folder} does not exist", None,
                                   "give the folder (or FILE.safetensors) that `mergelang run -o` wrote"))
    if folder.is_file():
        data, layout = _single_file(folder)
        errors += _single_outputs(folder, data, layout, say)
        return errors + (_inputs(folder, data, quick, say) if inputs else [])
    data = _manifest(folder)
    subs = data.get("outputs") or []
    if subs:
        say(f"{folder}: {len(subs)} named outputs")
        for name in subs:
            if not isinstance(name, str) or "/" in name or name in (".", ".."):
                errors.append(error("E420", f"{folder}: the manifest names a bad output {name!r}"))
                continue
            errors += verify_folder(folder / name, inputs, quick, say)
        return errors
    problems = check_outputs(folder, data)
    n = len(data.get("digests") or {})
    if problems:
        for p in problems:
            say(f"  output  DIFFERS  {p}")
        errors.append(error("E421", f"{folder}: {len(problems)} of its files differ from the "
                            "manifest", None, "the folder was changed after mergelang wrote it: "
                            "rerun the merge (its mergelang_recipe.mrg) to rebuild it"))
    else:
        say(f"{folder}: outputs ok ({n} files match their digests)")
    return errors + (_inputs(folder, data, quick, say) if inputs else [])


def _inputs(folder: Path, data: dict[str, Any], quick: bool, say: Any) -> list[Diagnostic]:
    from mergelang.io.verify import check_inputs

    errors: list[Diagnostic] = []
    prov = data.get("provenance")
    if not isinstance(prov, dict):
        say("  inputs  not recorded (written by an older mergelang, or by a tool without inputs)")
        return errors
    diffs, notes = check_inputs(prov, quick)
    for d in diffs:
        say(f"  input   DIFFERS  {d}")
    for note in notes:
        say(f"  input   note     {note}")
    if diffs:
        errors.append(error("E422", f"{folder}: {len(diffs)} of its input files are not what the "
                            "merge read", None, "rerunning the recipe now would not reproduce "
                            "this output; restore those inputs (or their recorded hf: revisions)"))
    else:
        how = "size and header" if quick else "content digests"
        say(f"{folder}: inputs ok (same {how} as when merged)")
    return errors


@click.command(name="verify")
@click.argument("out", type=click.Path())
@click.option("--no-inputs", is_flag=True, help="check only the output's own files")
@click.option("--quick", is_flag=True,
              help="compare the inputs by size, header and modification time only (no read of their "
                   "tensor data)")
@cli_guard
def verify_cmd(out: str, no_inputs: bool, quick: bool) -> None:
    """Check OUT (a folder, or a FILE.safetensors from `run -o FILE.safetensors`) against its
    manifest: every file as written (digests), and whether the inputs on this machine are still
    those the merge read. Exit 0 when all match, else 1."""
    errors = verify_folder(Path(out), not no_inputs, quick, lambda m: click.echo(m))
    if errors:
        raise MergelangError(errors)
    click.echo("verified: ok")
