"""`nsa-convert inspect MODEL_DIR|OUT_DIR`: what conversion does to a model, from its config alone."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.columns import Columns
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from nsa_convert.cli.app import app, emit_json, nsa_config, run_command, stderr


def _sites_table(inspection) -> Table:
    table = Table(title=f"attention sites ({inspection.model_type})")
    for column in ("layer", "module", "Hq/Hkv (G)", "Dk/Dv", "scale", "verdict"):
        table.add_column(column)
    for site in inspection.sites:
        verdict = "[green]NSA[/]" if site.convert else f"[yellow]dense[/]: {site.reason}"
        table.add_row(
            "" if site.layer is None else str(site.layer),
            site.module,
            f"{site.num_q_heads}/{site.num_kv_heads} ({site.group_size})",
            f"{site.head_dim}/{site.v_head_dim}",
            f"{site.scale:.4g}",
            verdict,
        )
    return table


def _costs_table(data: dict) -> Table:
    costs = data["cost_per_token"]
    table = Table(title=f"per generated token at context {data['context']:,} (all layers)")
    for column in ("", "dense", "NSA", "dense / NSA"):
        table.add_column(column, justify="right")
    labels = {
        "attention_flops": "attention FLOPs",
        "kv_cache_bytes": "KV-cache bytes per cached token",
        "kv_bytes_read": "KV bytes read",
    }
    for key, label in labels.items():
        table.add_row(
            label,
            f"{costs['dense'][key]:,}",
            f"{costs['nsa'][key]:,}",
            f"{costs['dense_over_nsa'][key]:.2f}×",
        )
    added = data["added_parameters"]
    table.caption = f"added parameters: {added['total_count']:,} ({added['total_bytes'] / 1e6:.2f} MB)"
    return table


def _graph_panel(title: str, lines, mark: str, style: str) -> Panel:
    text = Text()
    for line in lines:
        text.append(f"{mark if line.changed else ' '} {line.text}\n", style=style if line.changed else "")
    return Panel(text, title=title, expand=True)


@app.command()
def inspect(
    path: Path = typer.Argument(
        ..., help="A dense model directory or a converted one (config.json is enough)."
    ),
    layer: int = typer.Option(None, help="Layer whose graph is shown (default: the first converted one)."),
    context: int = typer.Option(32768, help="Context length T for the cost estimates."),
    onnx: Path = typer.Option(None, help="Also export the rewritten graph to this ONNX file."),
    window: int = typer.Option(512, help="Sliding window w (dense directories only)."),
    block_size: int = typer.Option(64, help="Selection block l'."),
    top_n: int = typer.Option(16, help="Selected blocks n."),
    compress_block: int = typer.Option(32, help="Compression block l."),
    compress_stride: int = typer.Option(16, help="Compression stride d."),
    branch_kv: str = typer.Option("shared", help="shared | independent."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model's own code."),
    json_output: bool = typer.Option(False, "--json", help="Print the facts as JSON (schema in README)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Show attention sites, added parameters, costs and one layer's graph before and after the rewrite."""
    from nsa_convert.inspection import inspect_model

    def body():
        config = nsa_config(
            block_size=block_size,
            top_n=top_n,
            window=window,
            compress_block=compress_block,
            compress_stride=compress_stride,
            branch_kv=branch_kv,
        )
        return inspect_model(
            path, config, context=context, layer=layer, onnx_path=onnx, trust_remote_code=trust_remote_code
        )

    inspection = run_command(body, debug=debug)
    data = inspection.to_dict()
    if json_output:
        emit_json(data)
        return
    stderr.print(_sites_table(inspection))
    stderr.print(_costs_table(data))
    site = inspection.layer_site
    stderr.print(
        Columns(
            [
                _graph_panel(f"{site.module}: before", inspection.before, "-", "red"),
                _graph_panel(f"{site.module}: after", inspection.after, "+", "green"),
            ],
            equal=True,
        )
    )
    if inspection.onnx_path is not None:
        stderr.print(
            f"[green]wrote[/] {inspection.onnx_path} (NSA as nsa_convert::NSAttention; weights left out)"
        )
