"""Bad input through the real command line: one clear line, a documented exit code, nothing lost.

Every case runs `python -m nsa_convert` (or, for the simulated full disk, the CLI's `main` in-process) on
a copy of a tiny model damaged one way, and checks: the exit code README documents, a single `error:`
line naming the file, no traceback, no OUT_DIR and no staging directory left (an old OUT_DIR unchanged),
and every file of the case — the model and anything beside it — byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertLMHeadModel,
    DistilBertConfig,
    DistilBertModel,
    Gemma2Config,
    GptOssConfig,
)

import nsa_convert
from nsa_convert.cli import main
from nsa_convert.errors import CheckpointError
from tests.models import make_checkpoint
from tests.test_checkpoint import FillingDisk

INDEX = "model.safetensors.index.json"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsa_convert", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` → the sha256 of a file, the target of a link, or 'dir'."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                entries[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                entries[key] = "dir"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def error_line(result: subprocess.CompletedProcess | str) -> str:
    """The one line the CLI printed (stderr holds nothing else)."""
    stderr = result if isinstance(result, str) else result.stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def assert_nothing_left(parent: Path, out: Path, old: dict[str, str] | None = None) -> None:
    """No staging or set-aside directory beside OUT_DIR; OUT_DIR absent, or exactly as it was."""
    assert not [p.name for p in parent.iterdir() if ".nsa-tmp-" in p.name or ".nsa-old-" in p.name]
    if old is None:
        assert not os.path.lexists(out)
    else:
        assert snapshot(out) == old


def old_output(case: Path) -> tuple[Path, dict[str, str]]:
    out = case / "out"
    out.mkdir()
    (out / "mine.txt").write_text("an earlier result")
    return out, snapshot(out)


# -- sources -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Healthy tiny models, built once: each case copies one and damages the copy."""
    root = tmp_path_factory.mktemp("sources")
    models = {
        "single": make_checkpoint(root / "single", "llama-g4"),
        "sharded": make_checkpoint(root / "sharded", "llama-g4", max_shard_size="100KB"),
    }
    assert len(list(models["sharded"].glob("*.safetensors"))) == 3
    (models["single"] / "tokenizer.json").write_text('{"version": "1.0"}')
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    others = {
        "bert": BertLMHeadModel(BertConfig(num_attention_heads=4, **small)),
        "distilbert": DistilBertModel(
            DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=4)
        ),
        "gemma2-softcap": AutoModelForCausalLM.from_config(
            Gemma2Config(
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=50.0, **small
            )
        ),
        "gpt-oss-sinks": AutoModelForCausalLM.from_config(
            GptOssConfig(
                **{**small, "intermediate_size": 32},
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                num_local_experts=2,
                num_experts_per_tok=1,
                layer_types=["full_attention", "full_attention"],
            )
        ),
    }
    for name, model in others.items():
        model.save_pretrained(root / name)
        models[name] = root / name
    return models


@pytest.fixture
def case(tmp_path) -> Path:
    """A directory for one case: the model goes to case/model, OUT_DIR is case/out."""
    return tmp_path


def copy_model(sources: dict[str, Path], name: str, case: Path) -> Path:
    return Path(shutil.copytree(sources[name], case / "model"))


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def rewrite_header(path: Path, edit: Callable[[bytes], bytes]) -> None:
    """Replace a safetensors file's JSON header by edit(header), keeping the data after it."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = edit(raw[8 : 8 + length])
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + length :])


def shard_names(model: Path) -> list[str]:
    return sorted(set(json.loads((model / INDEX).read_text())["weight_map"].values()))


def move_out_and_point_index_at(model: Path, case: Path, name_for: Callable[[Path], str]) -> None:
    """Move the last shard out of the model directory and make the index name it as name_for(its new path)."""
    shard = shard_names(model)[-1]
    outside = case / "elsewhere"
    outside.mkdir()
    shutil.move(model / shard, outside / shard)

    def repoint(index: dict) -> None:
        index["weight_map"] = {
            n: (name_for(outside / shard) if s == shard else s) for n, s in index["weight_map"].items()
        }

    edit_json(model / INDEX, repoint)


# -- the cases ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    source: str
    damage: Callable[[Path, Path], None]  # (model dir, case dir)
    exit_code: int
    names: str  # the file the message must name, relative to the model directory
    says: str  # and what it must say
    args: tuple[str, ...] = ()


def _dup_key(header: bytes) -> bytes:
    entries = json.loads(header)
    name = next(n for n in entries if n != "__metadata__")
    entry = json.dumps(entries[name])
    return header.replace(b"{", f'{{"{name}": {entry}, '.encode(), 1)


def _dup_across_shards(model: Path, case: Path) -> None:
    first, second = (model / name for name in shard_names(model)[:2])
    moved = next(iter(load_file(first)))
    tensors = load_file(second)
    tensors[moved] = load_file(first)[moved]
    save_file(tensors, second, metadata={"format": "pt"})


def _link_out(model: Path, case: Path, name: str) -> None:
    (case / "elsewhere").mkdir()
    shutil.move(model / name, case / "elsewhere" / name)
    (model / name).symlink_to(case / "elsewhere" / name)


def _pickle_only(model: Path, case: Path) -> None:
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")


class RunsCode:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_with_code(model: Path, case: Path) -> None:
    _pickle_only(model, case)
    state = torch.load(model / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = RunsCode(case / "code-ran")
    torch.save(state, model / "pytorch_model.bin")


def _config(edit: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    return lambda model, case: edit_json(model / "config.json", edit)


def _header(edit: Callable[[bytes], bytes], shard: str = "model.safetensors") -> Callable[[Path, Path], None]:
    return lambda model, case: rewrite_header(model / shard, edit)


def _truncate(model: Path, case: Path) -> None:
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _oversized_header(model: Path, case: Path) -> None:
    path = model / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + raw[8:])


CASES = {
    # config.json (exit 3)
    "config-missing": Case(
        "single", lambda m, c: (m / "config.json").unlink(), 3, "", "config.json not found"
    ),
    "config-not-json": Case(
        "single", lambda m, c: (m / "config.json").write_text("{not json"), 3, "config.json", "not valid JSON"
    ),
    "config-without-model-type": Case(
        "single", _config(lambda d: d.pop("model_type")), 3, "config.json", "no 'model_type' field"
    ),
    "config-field-of-wrong-type": Case(
        "single", _config(lambda d: d.update(hidden_size=None)), 3, "config.json", "hidden_size"
    ),
    "config-unknown-architecture": Case(
        "single",
        _config(lambda d: d.update(model_type="nosuchmodel", architectures=["NoSuchForCausalLM"])),
        3,
        "config.json",
        "model_type 'nosuchmodel' is not an architecture transformers",
    ),
    "config-needs-remote-code": Case(
        "single",
        _config(lambda d: d.update(auto_map={"AutoConfig": "configuration_x.XConfig"})),
        3,
        "config.json",
        "pass --trust-remote-code",
    ),
    # models NSA cannot take (exit 5)
    "encoder-bidirectional": Case("bert", lambda m, c: None, 5, "config.json", "not causal (bidirectional"),
    "encoder-without-causal-lm": Case(
        "distilbert", lambda m, c: None, 5, "config.json", "'distilbert' has no causal language model"
    ),
    "soft-capping": Case("gemma2-softcap", lambda m, c: None, 5, "config.json", "soft-capping"),
    "attention-sinks": Case("gpt-oss-sinks", lambda m, c: None, 5, "config.json", "attention sinks"),
    # weights (exit 4)
    "truncated": Case("single", _truncate, 4, "model.safetensors", "file is truncated"),
    "corrupt-header": Case(
        "single", _header(lambda h: b"[" + h[1:]), 4, "model.safetensors", "header is not valid JSON"
    ),
    "oversized-header": Case(
        "single", _oversized_header, 4, "model.safetensors", "exceeds the 100000000-byte limit"
    ),
    "duplicate-name-in-a-header": Case("single", _header(_dup_key), 4, "model.safetensors", "duplicate key"),
    "duplicate-name-across-shards": Case(
        "sharded",
        _dup_across_shards,
        4,
        "model-00002-of-00003.safetensors",
        "is also in model-00001-of-00003",
    ),
    "shape-disagrees-with-config": Case(
        "single",
        _config(lambda d: d.update(intermediate_size=128)),
        4,
        "model.safetensors",
        "has shape [96, 64] but config.json implies [128, 64]",
    ),
    "index-names-a-missing-shard": Case(
        "sharded",
        lambda m, c: (m / shard_names(m)[1]).unlink(),
        4,
        INDEX,
        "shard 'model-00002-of-00003.safetensors' does not exist",
    ),
    "index-escapes-with-dotdot": Case(
        "sharded",
        lambda m, c: move_out_and_point_index_at(m, c, lambda p: f"../elsewhere/{p.name}"),
        4,
        INDEX,
        "leaves the model directory",
    ),
    "index-names-an-absolute-path": Case(
        "sharded", lambda m, c: move_out_and_point_index_at(m, c, str), 4, INDEX, "is an absolute path"
    ),
    "shard-links-out": Case(
        "single", lambda m, c: _link_out(m, c, "model.safetensors"), 4, "", "outside the model directory"
    ),
    "tokenizer-links-out": Case(
        "single",
        lambda m, c: _link_out(m, c, "tokenizer.json"),
        4,
        "tokenizer.json",
        "outside the model directory",
    ),
    "pickle-only": Case("single", _pickle_only, 4, "", "pass --allow-pickle if you trust"),
    "pickle-that-runs-code": Case(
        "single",
        _pickle_with_code,
        4,
        "pytorch_model.bin",
        "cannot load as weights only",
        ("--allow-pickle",),
    ),
    # OUT_DIR (exit 6)
    "out-dir-inside-model-dir": Case("single", lambda m, c: None, 6, "nsa", "lies inside the source"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(sources, case, name):
    spec = CASES[name]
    model = copy_model(sources, spec.source, case)
    spec.damage(model, case)
    before = snapshot(case)
    out = model / "nsa" if name == "out-dir-inside-model-dir" else case / "out"

    result = run(str(model), str(out), *spec.args)

    assert result.returncode == spec.exit_code, result.stderr
    line = error_line(result)
    assert line.startswith("error: ") and spec.says in line, line
    assert str(model / spec.names) in line, line
    assert_nothing_left(out.parent, out)
    assert snapshot(case) == before
    assert not (case / "code-ran").exists()


# -- the flags that let risky input through ----------------------------------------------------------------


def test_allow_pickle_converts_and_loads_replacing_an_old_output(sources, case):
    model = copy_model(sources, "single", case)
    _pickle_only(model, case)
    before = snapshot(model)
    out, _ = old_output(case)

    result = run(str(model), str(out), "--allow-pickle", "--overwrite", "--json")

    assert result.returncode == 0, result.stderr
    assert snapshot(model) == before
    assert not (out / "mine.txt").exists() and not [p.name for p in case.iterdir() if ".nsa-" in p.name]
    assert (out / "tokenizer.json").read_text() == (model / "tokenizer.json").read_text()
    loaded = nsa_convert.load(out)
    original = torch.load(model / "pytorch_model.bin", weights_only=True)
    state = loaded.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in original.items())
    assert json.loads(result.stdout)["converted_sites"] == 2


CONFIGURATION_CODE = """
from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "custom-llama"
"""
MODELING_CODE = """
from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""
LOAD_SCRIPT = """
import sys, torch, nsa_convert
model = nsa_convert.load(sys.argv[1], trust_remote_code=True)
ids = torch.randint(0, model.config.vocab_size, (1, 40))
assert torch.isfinite(model(ids, use_cache=False).logits).all()
print(type(model).__name__, len(nsa_convert.api.nsa_modules(model)))
"""


def test_trust_remote_code_converts_and_keeps_the_code(sources, case):
    model = copy_model(sources, "single", case)
    (model / "configuration_custom.py").write_text(CONFIGURATION_CODE)
    (model / "modeling_custom.py").write_text(MODELING_CODE)
    edit_json(
        model / "config.json",
        lambda d: d.update(
            model_type="custom-llama",
            architectures=["CustomForCausalLM"],
            auto_map={
                "AutoConfig": "configuration_custom.CustomConfig",
                "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
            },
        ),
    )
    before = snapshot(model)
    env = {"HF_MODULES_CACHE": str(case / "hf-modules")}  # where transformers copies the model's code
    out = case / "out"

    result = run(str(model), str(out), "--trust-remote-code", env=env)
    assert result.returncode == 0, result.stderr
    assert {"configuration_custom.py", "modeling_custom.py"} <= {p.name for p in out.iterdir()}
    assert snapshot(model) == before
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["CustomForCausalLM", "2"]


# -- OUT_DIR -----------------------------------------------------------------------------------------------


def test_existing_out_dir_is_refused_without_overwrite(sources, case):
    model = copy_model(sources, "single", case)
    out, old = old_output(case)
    before = snapshot(model)

    refused = run(str(model), str(out))

    assert refused.returncode == 6
    assert str(out) in error_line(refused) and "pass --overwrite" in error_line(refused)
    assert_nothing_left(case, out, old)
    assert snapshot(model) == before


def test_disk_full_while_writing_exits_6_and_keeps_the_old_output(sources, case, monkeypatch, capsys):
    model = copy_model(sources, "sharded", case)
    out, old = old_output(case)
    before = snapshot(model)
    FillingDisk(monkeypatch, room=150_000)  # the source holds ~280 kB: the disk fills in the second shard

    with pytest.raises(SystemExit) as exited:
        main([str(model), str(out), "--overwrite", "--max-shard-size", "100KB"])

    assert exited.value.code == 6
    line = error_line(capsys.readouterr().err)
    assert str(out) in line and "disk full while writing" in line
    assert_nothing_left(case, out, old)
    assert snapshot(model) == before


@pytest.fixture(scope="module")
def larger_source(tmp_path_factory) -> Path:
    """About 300 MB in 20 shards: long enough to write that a signal lands mid-write."""
    root = tmp_path_factory.mktemp("larger")
    return make_checkpoint(
        root / "model",
        "llama-g4",
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2048,
        max_shard_size="16MB",
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_mid_write_exits_130_and_leaves_nothing(larger_source, case, signum):
    out, old = old_output(case)
    before = snapshot(larger_source)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nsa_convert",
            str(larger_source),
            str(out),
            "--overwrite",
            "--max-shard-size",
            "8MB",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Python turns SIGINT into KeyboardInterrupt only when the parent did not leave it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    staging = []
    while not staging and process.poll() is None and time.monotonic() < deadline:
        staging = [p for p in case.iterdir() if p.name.startswith(".out.nsa-tmp-")]
        time.sleep(0.01)
    # The first shard file shows that the writing has begun.
    while staging and process.poll() is None and not any(staging[0].glob(".shard-*")):
        time.sleep(0.005)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)

    assert staging, f"the conversion ended before it began writing: {stderr}"
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted: nothing was written" in stderr
    assert_nothing_left(case, out, old)
    assert snapshot(larger_source) == before


@pytest.mark.parametrize(
    ("error", "code", "shown"),
    [
        (RuntimeError("a bug\nover two lines"), 1, "error: unexpected RuntimeError: a bug over two lines"),
        (
            PermissionError(13, "Permission denied", "/models/x/tokenizer.json"),
            1,
            "'/models/x/tokenizer.json'",
        ),
        (
            CheckpointError("tensor 'w[/]' in [bold]", Path("/m/[red]x")),
            4,
            "error: /m/[red]x: tensor 'w[/]' in [bold]",
        ),
    ],
    ids=["bug", "os-error", "markup-in-names"],
)
def test_any_failure_is_one_line_shown_as_is(case, monkeypatch, capsys, error, code, shown):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("nsa_convert.api.convert", fail)
    with pytest.raises(SystemExit) as exited:
        main([str(case / "model"), str(case / "out")])
    assert exited.value.code == code
    assert shown in error_line(capsys.readouterr().err)
