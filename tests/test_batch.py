"""`nsa-convert batch`: manifests, --keep-going, --jobs, up-to-date outputs, reports and progress."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from rich.progress import Progress

from nsa_convert import __version__
from nsa_convert.batch import (
    BatchEntry,
    EntryFinished,
    EntryResult,
    EntryStarted,
    ManifestError,
    ShardProgress,
    load_manifest,
    output_state,
    run_entry,
)
from nsa_convert.checkpoint import CheckpointReader
from nsa_convert.cli.batch import _PlainView, _RichView
from nsa_convert.config import NSAConfig
from nsa_convert.verify import verify
from tests.models import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("llama-g4", "mistral-mqa", "qwen2-tied-g7")
SMALL = {"window": 64, "block_size": 16, "top_n": 4, "compress_block": 8, "compress_stride": 4}
SMALL_TOML = "\n".join(f"{key} = {value}" for key, value in SMALL.items())


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsa_convert", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """models/<arch> for three architectures, and broken/: a config with a weight file that is not safetensors."""
    root = tmp_path_factory.mktemp("batch")
    for arch in ARCHS:
        make_checkpoint(root / "models" / arch, arch)
    broken = root / "broken"
    broken.mkdir()
    shutil.copy(root / "models" / "llama-g4" / "config.json", broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return root


def statuses(report: dict) -> dict[str, str]:
    return {Path(entry["source"]).name: entry["status"] for entry in report["entries"]}


def test_keep_going_converts_the_rest_then_reruns_skip_and_rebuild(sources):
    manifest = sources / "batch.toml"
    manifest.write_text(
        f"[defaults]\n{SMALL_TOML}\n\n"
        '[[models]]\nsource = "models/*"\noutput = "out/{name}-nsa"\n\n'
        '[[models]]\nsource = "broken"\noutput = "out/broken-nsa"\n'
    )
    (sources / "out").mkdir()
    result = run("batch", str(manifest), "--keep-going", "--jobs", "2", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == "nsa-convert.batch/1" and report["exit_code"] == 1
    assert statuses(report) == dict.fromkeys(ARCHS, "converted") | {"broken": "failed"}
    broken = report["entries"][-1]
    assert broken["exit_code"] == 4 and "broken/model.safetensors" in broken["error"]
    for entry in report["entries"][:-1]:
        assert entry["error"] is None and entry["seconds"] > 0
        assert entry["output_bytes"] > entry["source_bytes"] > 0
    # Plain progress lines (stderr is not a terminal), no traceback, nothing half-written.
    assert "reading shard 1/1 model.safetensors" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (sources / "out").iterdir()) == [f"{arch}-nsa" for arch in ARCHS]
    for arch in ARCHS:
        checked = verify(sources / "out" / f"{arch}-nsa")
        assert checked.ok, checked.problems

    # Second run, YAML: one output unchanged, one with a new window (stale), no broken entry.
    rerun = sources / "rerun.yaml"
    rerun.write_text(
        yaml.safe_dump(
            {
                "defaults": SMALL,
                "models": [
                    {"source": "models/llama-g4", "output": "out/llama-g4-nsa"},
                    {"source": "models/mistral-mqa", "output": "out/mistral-mqa-nsa", "window": 32},
                ],
            }
        )
    )
    result = run("batch", str(rerun), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert statuses(report) == {"llama-g4": "up-to-date", "mistral-mqa": "rebuilt"}
    assert report["entries"][1]["reason"] == "the options changed"
    config = json.loads((sources / "out" / "mistral-mqa-nsa" / "config.json").read_text())
    assert config["nsa"]["config"]["window"] == 32


def test_without_keep_going_the_first_failure_stops_the_batch(sources, tmp_path):
    manifest = tmp_path / "batch.toml"
    manifest.write_text(
        f"[defaults]\n{SMALL_TOML}\n\n"
        f'[[models]]\nsource = "{sources / "broken"}"\noutput = "out/broken-nsa"\n\n'
        f'[[models]]\nsource = "{sources / "models" / "llama-g4"}"\noutput = "out/llama-nsa"\n'
    )
    result = run("batch", str(manifest))
    assert result.returncode == 1
    assert "1 failed, 1 skipped" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("manifest", "args", "message"),
    [
        (f"[defaults]\n{SMALL_TOML}\nblocksize = 16\n", [], "did you mean 'block_size'"),
        ('[[models]]\nsource = "nothing/*"\noutput = "out/{name}"\n', [], "matches no directory"),
        ('[[models]]\nsource = "."\noutput = "out"\ncompress_stride = 5\n', [], "must divide"),
        ("[[models]\n", [], "not valid TOML"),
        ('[[models]]\nsource = "."\noutput = "out"\n', ["--jobs", "0"], "--jobs"),
    ],
)
def test_bad_manifest_or_usage_exits_2_with_one_line(tmp_path, manifest, args, message):
    path = tmp_path / "batch.toml"
    path.write_text(manifest)
    result = run("batch", str(path), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_manifest_expands_globs_relative_to_itself_and_merges_options(tmp_path):
    for name in ("b", "a"):
        (tmp_path / "models" / name).mkdir(parents=True)
    toml = tmp_path / "m.toml"
    toml.write_text(
        f"[defaults]\n{SMALL_TOML}\nmax_shard_size = '1MB'\n\n"
        '[[models]]\nsource = "models/*"\noutput = "out/{name}-nsa"\ntop_n = 8\nbranch_kv = "independent"\n'
    )
    entries = load_manifest(toml)
    assert [(e.source, e.output) for e in entries] == [
        (tmp_path / "models" / name, tmp_path / "out" / f"{name}-nsa") for name in ("a", "b")
    ]
    assert entries[0].config == NSAConfig(**(SMALL | {"top_n": 8, "branch_kv": "independent"}))
    assert entries[0].max_shard_bytes == 10**6 and entries[0].origin == "models[0]"
    yml = tmp_path / "m.yml"
    yml.write_text(
        yaml.safe_dump(
            {
                "defaults": SMALL | {"max_shard_size": "1MB"},
                "models": [
                    {"source": "models/*", "output": "out/{name}-nsa", "top_n": 8, "branch_kv": "independent"}
                ],
            }
        )
    )
    assert load_manifest(yml) == entries


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[models]]\nsource = "models/*"\noutput = "out"\n', "must contain {name}"),
        (
            '[[models]]\nsource = "models/a"\noutput = "out"\n[[models]]\nsource = "models/a"\noutput = "out"\n',
            "also written by models[0]",
        ),
        ('[[models]]\nsource = "models/a"\noutput = "out"\nwindow = true\n', "window must be an integer"),
        ('[[models]]\nsource = "models/zzz"\noutput = "out"\n', "is not a directory"),
        ('[[models]]\noutput = "out"\n', "'source' must be a non-empty path"),
        ('models = "models/a"\n', "'models' must be a non-empty list"),
        ('jobs = 2\n[[models]]\nsource = "models/a"\noutput = "out"\n', "unknown key 'jobs'"),
        (
            '[[models]]\nsource = "models/a"\noutput = "out"\nmax_shard_size = "lots"\n',
            "cannot read size 'lots'",
        ),
    ],
)
def test_manifest_errors_name_the_entry_and_the_problem(tmp_path, text, message):
    (tmp_path / "models" / "a").mkdir(parents=True)
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("m.yaml", "models: [\n", "not valid YAML"),
        ("m.json", "{}", "a manifest is a"),
        ("none.toml", None, "not found"),
    ],
)
def test_unreadable_manifests(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path / name)


def _entry(source: Path, output: Path, **options) -> BatchEntry:
    return BatchEntry(source, output, NSAConfig(**(SMALL | options)), max_shard_bytes=2**30)


def test_output_state_compares_fingerprint_options_and_version(sources, tmp_path):
    source = sources / "models" / "llama-g4"
    fingerprint = CheckpointReader(source).fingerprint()
    output = tmp_path / "out"
    entry = _entry(source, output)
    assert output_state(entry, fingerprint) == ("missing", "no output yet")

    # An output's weights need only be readable for the check: a copy of the source with an nsa section.
    shutil.copytree(source, output)
    config = json.loads((output / "config.json").read_text())
    section = {"converter": "nsa-convert", "version": __version__, "config": entry.config.to_dict()}
    config["nsa"] = section | {"source_fingerprint": fingerprint}
    (output / "config.json").write_text(json.dumps(config))
    assert output_state(entry, fingerprint)[0] == "up-to-date"
    assert output_state(entry, "0" * 64) == ("stale", "the source's weights changed")
    assert output_state(_entry(source, output, top_n=8), fingerprint) == ("stale", "the options changed")
    config["nsa"]["version"] = "0.0.1"
    (output / "config.json").write_text(json.dumps(config))
    assert output_state(entry, fingerprint)[1].startswith("converted by nsa-convert 0.0.1")


def test_a_directory_batch_did_not_write_is_never_replaced(sources, tmp_path):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("keep")
    result = run_entry(0, _entry(sources / "models" / "llama-g4", output))
    assert result.status == "failed" and result.exit_code == 6
    assert "not an nsa-convert output" in result.error
    assert [p.name for p in output.iterdir()] == ["notes.txt"]


def _events(tmp_path: Path) -> tuple[list[BatchEntry], list]:
    entries = [_entry(tmp_path / "src", tmp_path / "out")]
    result = EntryResult(
        0, tmp_path / "src", tmp_path / "out", "converted", "no output yet", 1.5, 10**6, 2 * 10**6
    )
    shards = [ShardProgress(0, f"s{n}.safetensors", n, 2, n * 100, 200) for n in (1, 1, 2)]
    return entries, [EntryStarted(0, "convert", "no output yet"), *shards, EntryFinished(result)]


def test_plain_view_prints_one_line_per_entry_step_and_shard(tmp_path, capsys):
    entries, events = _events(tmp_path)
    view = _PlainView(entries)
    for event in events:
        view(event)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4
    assert lines[0].endswith("convert (no output yet)") and "shard 2/2 s2.safetensors" in lines[2]
    assert "converted in 1.5 s (1.0 MB -> 2.0 MB" in lines[3]


def test_rich_view_shows_entries_and_shards_on_a_terminal(tmp_path):
    entries, events = _events(tmp_path)
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    with Progress(console=console) as progress:
        view = _RichView(progress, entries)
        for event in events[:-1]:
            view(event)
        assert progress.tasks[1].description == "src: shard 2/2" and progress.tasks[1].completed == 200
        view(events[-1])
        assert len(progress.tasks) == 1 and progress.tasks[0].completed == 1
    assert "converted in 1.5 s" in console.file.getvalue()


def test_example_manifest_and_ci_workflow():
    entries = load_manifest(ROOT / "examples" / "batch.toml")
    assert entries and all(entry.source == ROOT / "examples" / "tiny-llama" for entry in entries)
    workflow = yaml.safe_load((ROOT / "examples" / "ci-workflow.yml").read_text())
    commands = "\n".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])
    assert "nsa-convert batch examples/batch.toml" in commands and "--json" in commands
    assert "nsa-convert verify" in commands
