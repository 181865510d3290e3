"""`nsa-convert convert MODEL_DIR OUT_DIR`: the main job."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from nsa_convert.cli.app import app, emit_json, nsa_config, run_command, stderr
from nsa_convert.config import BRANCH_KV_MODES, DTYPES, parse_size
from nsa_convert.errors import UsageError


def sites_table(sites) -> Table:
    table = Table(title="attention sites")
    for column in ("module", "Hq/Hkv (G)", "head dim", "verdict"):
        table.add_column(column)
    for site in sites:
        verdict = "[green]NSA[/]" if site.convert else f"[yellow]dense[/]: {site.reason}"
        table.add_row(
            site.module,
            f"{site.num_q_heads}/{site.num_kv_heads} ({site.group_size})",
            str(site.head_dim),
            verdict,
        )
    return table


@app.command()
def convert(
    model_dir: Path = typer.Argument(..., help="Dense model directory (config.json + safetensors)."),
    out_dir: Path = typer.Argument(
        ..., help="Where the NSA checkpoint is written (built beside it, renamed at the end)."
    ),
    window: int = typer.Option(512, help="Sliding window w (tokens)."),
    block_size: int = typer.Option(64, help="Selection block l' (tokens)."),
    top_n: int = typer.Option(16, help="Selected blocks per query n (3 of them forced)."),
    compress_block: int = typer.Option(32, help="Compression block l (tokens)."),
    compress_stride: int = typer.Option(16, help="Compression stride d; must divide l and l'."),
    branch_kv: str = typer.Option("shared", help=f"Keys/values per branch: {' | '.join(BRANCH_KV_MODES)}."),
    dtype: str = typer.Option("auto", help=f"dtype of the new NSA tensors: {' | '.join(DTYPES)}."),
    max_shard_size: str = typer.Option("5GB", help="Largest output shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR atomically if it exists."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Accept .bin/.pt weights (weights_only)."
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model's own code."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON report on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Convert MODEL_DIR into an NSA model in OUT_DIR."""
    from nsa_convert.api import convert as convert_model

    def body():
        config = nsa_config(
            block_size=block_size,
            top_n=top_n,
            window=window,
            compress_block=compress_block,
            compress_stride=compress_stride,
            branch_kv=branch_kv,
            dtype=dtype,
        )
        try:
            shard_bytes = parse_size(max_shard_size)
        except ValueError as err:
            raise UsageError(f"--max-shard-size: {err}") from None
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
            disable=not stderr.is_terminal or json_output,
        ) as progress:
            task = progress.add_task("converting", total=None)

            def on_tensor(name: str, done: int, total: int) -> None:
                progress.update(task, completed=done, total=total, description=name[-40:])

            return convert_model(
                model_dir,
                out_dir,
                config,
                overwrite=overwrite,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
                max_shard_bytes=shard_bytes,
                progress=on_tensor,
            )

    report = run_command(body, debug=debug)
    if json_output:
        emit_json(report.to_dict())
        return
    stderr.print(sites_table(report.sites))
    n_converted = sum(site.convert for site in report.sites)
    stderr.print(
        f"[green]wrote[/] {report.output}: {n_converted}/{len(report.sites)} sites converted, "
        f"{report.tensors_added} new tensors, {len(report.shards)} shard(s), "
        f"{report.bytes_written / 1e6:.1f} MB in {report.seconds:.1f} s"
    )
    for note in report.notes:
        stderr.print(f"note: {note}")
