"""`nsa-convert verify OUT_DIR [--against MODEL_DIR]`: is a converted checkpoint complete and intact?"""

from __future__ import annotations

from pathlib import Path

import typer

from nsa_convert.cli.app import app, emit_json, run_command, stderr


@app.command()
def verify(
    out_dir: Path = typer.Argument(..., help="A directory written by nsa-convert."),
    against: Path = typer.Option(
        None, "--against", help="The dense source: compare tensors and logits (T ≤ window) with it."
    ),
    seq_len: int = typer.Option(
        None, "--seq-len", help="T for the logits (default: min(window, top_n·block_size, 128))."
    ),
    device: str = typer.Option("cpu", help="Where the models run for the load and logits checks."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Accept .bin/.pt weights in --against (weights_only)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON report on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Check OUT_DIR's tensors, shard hashes and loading; with --against, its logits against the dense model."""
    from nsa_convert.verify import verify as verify_checkpoint

    report = run_command(
        lambda: verify_checkpoint(
            out_dir, against, seq_len=seq_len, device=device, allow_pickle=allow_pickle
        ),
        debug=debug,
    )
    if json_output:
        emit_json(report.to_dict())
        if not report.ok:
            raise typer.Exit(1)
        return
    for note in report.notes:
        stderr.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    if not report.ok:
        stderr.print(
            f"error: {out_dir}: verification failed ({len(report.problems)} problem{'s' if len(report.problems) > 1 else ''}):",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        for problem in report.problems:
            stderr.print(f"  - {problem}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)
    checked = f"{report.tensors} tensors in {len(report.shards)} shard(s), sha256 as recorded, loads"
    logits = (
        f"; logits match the dense model (relative error {report.logits_error:.1e} at T={report.seq_len})"
        if report.logits_error is not None
        else ""
    )
    stderr.print(f"verified {out_dir}: {checked}{logits}", highlight=False, markup=False, soft_wrap=True)
