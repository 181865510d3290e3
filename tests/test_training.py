"""examples/continue_training.py on the CPU with the shipped tiny Llama, converted with a small NSA geometry
(w = 64, l' = 16, n = 4, l = 8, d = 4) so that rows of 192 tokens use every sparse branch."""

from __future__ import annotations

import importlib.util
import os
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import nsa_convert
from nsa_convert.api import nsa_modules
from nsa_convert.config import NSAConfig
from tests.models import SMALL_NSA

ROOT = Path(__file__).resolve().parent.parent
SMALL = NSAConfig(**SMALL_NSA)
SEQ_LEN = 192


def load_example():
    spec = importlib.util.spec_from_file_location(
        "continue_training", ROOT / "examples" / "continue_training.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "nsa"
    nsa_convert.convert(ROOT / "examples" / "tiny-llama", out, SMALL)
    return out


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            found.update({name: f.get_tensor(name).float() for name in f.keys()})  # noqa: SIM118
    return found


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Short documents (random slices of os.py, 100 to 700 characters): rows pack several of them."""
    source = (Path(sysconfig.get_paths()["stdlib"]) / "os.py").read_text()
    directory = tmp_path_factory.mktemp("texts")
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for i in range(40):
        start = int(torch.randint(0, len(source) - 700, (1,), generator=generator))
        (directory / f"{i:02d}.txt").write_text(source[start : start + 100 + 15 * i])
    return directory


def run(checkpoint: Path, texts: Path, save: Path, *options: str) -> list[dict]:
    argv = [str(checkpoint), "--data", str(texts), "--seq-len", str(SEQ_LEN), "--device", "cpu"]
    return example.train(example.parse_args([*argv, "--save", str(save), *options]))


def test_repeated_batch_is_learned_and_every_new_parameter_moves(checkpoint, texts, tmp_path):
    history = run(
        checkpoint,
        texts,
        tmp_path / "trained",
        "--steps",
        "6",
        "--repeat-batch",
        "--lr",
        "3e-3",
        "--nsa-lr",
        "1e-2",
    )
    assert all(record["documents"] >= 2 for record in history)  # packed rows
    losses = [record["loss"] for record in history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
    layers = set(nsa_modules(nsa_convert.load(checkpoint)))
    for record in history:
        assert set(record["gates"]) == layers
        assert all(0.0 < mean < 1.0 for means in record["gates"].values() for mean in means)
    assert history[-1]["gates"] != history[0]["gates"]

    before, after = tensors(checkpoint), tensors(tmp_path / "trained")
    new = [name for name in before if ".nsa." in name]
    assert new and set(new) <= set(after)
    assert all(torch.isfinite(after[name]).all() for name in new)
    # At the conversion's initialisation φ_K adds one vector to every compressed key, which changes no
    # softmax: its biases and position encoding start with no gradient and may not move in a few steps.
    invariant = ("compress_k.fc1.bias", "compress_k.fc2.bias", "compress_k.pos")
    for name in new:
        if not name.endswith(invariant):
            assert not torch.equal(after[name], before[name]), name
    reloaded = nsa_convert.load(tmp_path / "trained", dtype=torch.float32)
    ids = torch.randint(0, reloaded.config.vocab_size, (1, 100))
    assert torch.isfinite(reloaded(ids, use_cache=False).logits).all()


def test_warm_up_trains_only_the_new_parameters(checkpoint, texts, tmp_path):
    history = run(
        checkpoint, texts, tmp_path / "warm", "--steps", "2", "--warmup-nsa-only", "2", "--lr", "1e-2"
    )
    assert all(record["nsa_only"] for record in history)
    before, after = tensors(checkpoint), tensors(tmp_path / "warm")
    # compress_k's biases may not move in two steps: shifting every compressed key alike changes no softmax.
    gates = [name for name in before if ".nsa.gate." in name]
    assert gates and all(not torch.equal(after[name], before[name]) for name in gates)
    for name, value in before.items():
        if ".nsa." not in name and name in after:
            assert torch.equal(after[name], value), name


def test_parameter_groups_give_new_parameters_and_gates_their_rates_and_no_decay_to_vectors(checkpoint):
    model = nsa_convert.load(checkpoint)
    new = {id(p) for m in nsa_modules(model).values() for p in m.parameters()}
    gates = {id(p) for m in nsa_modules(model).values() for p in m.gate.parameters()}
    assert gates and gates < new
    for gate_lr in (None, 0.0, 7e-4):
        seen = []
        for group in nsa_convert.parameter_groups(model, 1e-3, 5e-2, gate_lr, weight_decay=0.1):
            for p in group["params"]:
                seen.append(id(p))
                gate_rate = 5e-2 if gate_lr is None else gate_lr
                assert group["lr"] == (gate_rate if id(p) in gates else 5e-2 if id(p) in new else 1e-3)
                assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
        held = gate_lr == 0.0
        expected = [id(p) for p in model.parameters() if not (held and id(p) in gates)]
        assert sorted(seen) == sorted(expected)
        assert all(p.requires_grad != (held and id(p) in gates) for p in model.parameters())


def test_parameter_groups_of_a_dense_model_put_everything_at_lr():
    model = transformers.AutoModelForCausalLM.from_pretrained(ROOT / "examples" / "tiny-llama")
    groups = nsa_convert.parameter_groups(model, 1e-3, 5e-2, 0.0, weight_decay=0.1)
    assert {group["lr"] for group in groups} == {1e-3}
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))


def test_gate_lr_zero_holds_the_gates_while_the_rest_trains(checkpoint, texts, tmp_path):
    run(checkpoint, texts, tmp_path / "held", "--steps", "2", "--gate-lr", "0", "--nsa-lr", "1e-2")
    before, after = tensors(checkpoint), tensors(tmp_path / "held")
    gates = [name for name in before if ".nsa.gate." in name]
    assert gates and all(torch.equal(after[name], before[name]) for name in gates)
    moved = [name for name in before if ".nsa.compress_v.fc1.weight" in name]
    assert moved and all(not torch.equal(after[name], before[name]) for name in moved)


@pytest.mark.parametrize("pool", ["1", "3"])
def test_selection_distillation_adds_its_term_on_packed_rows(checkpoint, tmp_path, pool):
    """Documents long enough that every packed row holds one past the first ranked position (n·l' = 64)."""
    source = (Path(sysconfig.get_paths()["stdlib"]) / "os.py").read_text()
    (tmp_path / "data").mkdir()
    for i in range(6):
        (tmp_path / "data" / f"{i}.txt").write_text(source[3000 * i : 3000 * i + 500])
    history = run(
        checkpoint, tmp_path / "data", tmp_path / "distilled", "--steps", "2", "--distill-selection", "0.5",
        "--distill-pool", pool,
    )  # fmt: skip
    assert all(0 < record["selection_kl"] < 10 for record in history)
    assert "selection KL" in example.format_record(history[0], 2)


def test_packed_rows_restart_positions_at_each_document():
    pieces = iter([[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14], [15, 16, 17]])
    rows = example.packed_batches(pieces, seq_len=4, batch_size=2)
    first, second = next(rows), next(rows)
    assert first["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert first["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert first["labels"].tolist() == [[-100, 2, 3, -100], [-100, 6, 7, 8]]
    # [9, 10] fills a row with the first half of [11 … 14]; the 2-token rest becomes its own document.
    assert second["input_ids"].tolist() == [[9, 10, 11, 12], [13, 14, 15, 16]]
    assert second["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]


def test_text_files_default_to_the_standard_library(tmp_path):
    files = example.text_files(None)
    assert any(path.name == "os.py" for path in files)
    assert not any("site-packages" in path.parts for path in files)
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.bin").write_bytes(b"\0")
    assert example.text_files(tmp_path) == [tmp_path / "a.txt"]
