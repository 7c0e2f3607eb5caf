"""`mergelang rmm` and `mergelang rmm-rebuild`: reversible merging of LoRA adapters
(tools/rmm.py)."""

from __future__ import annotations

import click

from mergelang.commands.common import cli_guard


@click.command(name="rmm")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="the RMM folder (basis, coefficients, config)")
@click.option("--basis", type=click.IntRange(min=1), required=True,
              help="basis vectors per position (fewer than the adapters: compressed; as many: exact)")
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="task names, one per adapter in order (default: the folder names)")
@click.option("--force", is_flag=True, help="replace an earlier mergelang output at OUTPUT")
@cli_guard
def rmm_cmd(adapters: tuple[str, ...], out: str, basis: int, names: tuple[str, ...], force: bool) -> None:
    """Reversible merge of LoRA ADAPTERS: a shared basis and per-task coefficients from which
    each adapter is rebuilt (`mergelang rmm-rebuild`)."""
    from mergelang.tools.rmm import reversible_merge

    cfg = reversible_merge(adapters, out, basis, names=names or None, force=force,
                           log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {out}: {len(cfg['tasks'])} tasks, {cfg['basis']} basis vectors per position", err=True)


@click.command(name="rmm-rebuild")
@click.argument("folder", type=click.Path())
@click.option("--task", required=True, help="the task's name or index")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="the adapter folder")
@click.option("--force", is_flag=True, help="replace an earlier mergelang output at OUTPUT")
@cli_guard
def rmm_rebuild_cmd(folder: str, task: str, out: str, force: bool) -> None:
    """Rebuild one task's PEFT LoRA adapter from an RMM FOLDER."""
    from mergelang.tools.rmm import rebuild

    path = rebuild(folder, task, out, force=force)
    click.echo(f"wrote {path}", err=True)
