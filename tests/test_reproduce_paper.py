"""benchmarks/reproduce_paper.py end to end with its CPU preset: pretrain, convert, continue, evaluate."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import nsa_convert
from nsa_convert.api import nsa_modules

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location(
        "reproduce_paper", ROOT / "benchmarks" / "reproduce_paper.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through the module
    spec.loader.exec_module(module)
    return module


script = load_script()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared machine
    try:
        return out, script.main(["--out", str(out), "--preset", "tiny"])
    finally:
        torch.set_num_threads(threads)


def test_writes_every_model_and_metric(run):
    out, results = run
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    preset = script.PRESETS["tiny"]
    assert set(results["models"]) == {"dense", "nsa_converted", "dense_continued", "nsa_continued"}
    stages = ["pretrain", "evaluate dense", "convert and evaluate"]
    stages += ["train and evaluate dense_continued", "train and evaluate nsa_continued"]
    assert list(results["seconds"]) == stages
    assert all(s >= 0 for s in results["seconds"].values())
    for model in results["models"].values():
        assert [int(n) for n in model["perplexity"]] == list(preset.eval_lens)
        assert all(math.isfinite(p) and 1 < p < script.VOCAB for p in model["perplexity"].values())
        assert [int(n) for n in model["passkey"]] == list(preset.passkey_lens)
        assert all(0 <= a <= 1 for a in model["passkey"].values())
    section = json.loads((out / "nsa" / "config.json").read_text())["nsa"]
    assert {k: section["config"][k] for k in preset.nsa} == preset.nsa
    assert len(section["sites"]) == preset.layers


def test_converted_model_keeps_the_dense_perplexity_within_the_window(run):
    """At T ≤ min(w, n·l') the converted model computes the dense model; past it, NSA differs."""
    _, results = run
    dense, nsa = results["models"]["dense"]["perplexity"], results["models"]["nsa_converted"]["perplexity"]
    short, long = (str(n) for n in script.PRESETS["tiny"].eval_lens)
    assert abs(nsa[short] / dense[short] - 1) < 1e-3
    assert nsa[long] != dense[long]


def test_training_lowers_the_loss(run):
    _, results = run
    losses = results["losses"]
    assert all(math.isfinite(x) for logs in losses.values() for log in logs.values() for x in log)
    assert max(losses["pretrain"]["lm"][-5:]) < min(losses["pretrain"]["lm"][:3]) - 1.0


def test_passkey_row_states_the_key_at_its_depth_and_ends_with_it():
    stream = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(1))
    row, stated = script.passkey_row(stream, 600, 0.25, "40917", 123)
    text = bytes(row.tolist())
    assert len(row) == 600 and text.endswith(b"The pass key is 40917")
    statement = text.index(b"\n# The pass key is 40917.")
    filler = 600 - len(b"\n# The pass key is 40917. Remember it. 40917 is the pass key.\n") - 46
    assert statement == int(0.25 * filler)
    assert torch.equal(row[:statement], stream[123 : 123 + statement])
    first, second = statement + len(b"\n# The pass key is "), text.index(b"Remember it. 40917") + 13
    assert stated.tolist() == [*range(first, first + 5), *range(second, second + 5)]
    assert bytes(row[stated].tolist()) == b"4091740917"


def test_the_answer_query_is_the_one_before_the_key_digits():
    stream = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(7))
    for row, stated in script.passkey_trials(stream, 300, 5, seed=1):
        query = len(row) - script.KEY_DIGITS - 1
        assert bytes(row[query - 3 : query + 1].tolist()) == b" is "
        assert torch.equal(row[query + 1 :], row[stated[: script.KEY_DIGITS]])


class Oracle(torch.nn.Module):
    """Puts (nearly) all its mass on the true next token of its input, except at position `wrong`."""

    def __init__(self, wrong: int):
        super().__init__()
        self.wrong = wrong

    def forward(self, input_ids, use_cache=True):
        target = torch.roll(input_ids, -1, dims=1)
        target[:, self.wrong] = (target[:, self.wrong] + 1) % 256
        return SimpleNamespace(logits=50.0 * torch.nn.functional.one_hot(target, script.VOCAB).float())


@pytest.mark.parametrize("wrong,accuracy", [(-1, 1.0), (-2, 0.0), (-6, 0.0), (-7, 1.0)])
def test_passkey_check_reads_exactly_the_five_key_predictions(wrong, accuracy):
    """Logits at −6 … −2 predict the key digits; the last one and those before the key do not count."""
    stream = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(2))
    got = script.passkey(Oracle(wrong), stream, 300, 3, 2, torch.device("cpu"), seed=0)["accuracy"]
    assert got == accuracy


def test_perplexity_scores_each_token_by_the_prediction_before_it():
    """An oracle scores perplexity 1 (the last position predicts past the window and does not count); one
    wrong prediction among 15 costs exp(50 / 15)."""
    stream = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(3))
    perfect = script.perplexity(Oracle(-1), stream, 16, 160, 4, torch.device("cpu"))
    one_wrong = script.perplexity(Oracle(-2), stream, 16, 160, 4, torch.device("cpu"))
    assert perfect == pytest.approx(1.0, abs=1e-6)
    assert one_wrong == pytest.approx(math.exp(50 / 15), rel=1e-3)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    scales = [script.lr_scale(step, 100) for step in range(100)]
    assert scales[0] == pytest.approx(0.2) and scales[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(scales[4:]))
    assert scales[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("top_n,expected", [(3, 0.0), (16, 1.0)])
def test_key_block_recall_of_the_forced_blocks_alone_and_of_every_block(run, top_n, expected):
    """top_n 3 = only the forced blocks (first, current, previous: the key lies in none of them);
    16 = every block of a 256-token row."""
    out, _ = run
    model = nsa_convert.load(out / "nsa").eval()
    for module in nsa_modules(model).values():
        module.params = dataclasses.replace(module.params, top_n=top_n)
    stream = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(4))
    got = script.passkey(model, stream, 256, 6, 4, torch.device("cpu"), seed=0)["key_block_recall"]
    assert got["any"] == expected and got["layers"] == [expected] * len(nsa_modules(model))


def test_key_block_recall_reads_the_answer_query_and_either_statement(run, monkeypatch):
    """Hand-made selections: layer 0's first KV group picks the block of the second statement's last digit
    in every trial, layer 1 picks the first digit's block in all groups of trial 0 alone; every other
    group picks a block that holds no key digit.  A 100-token window reaches some statements."""
    out, _ = run
    model = nsa_convert.load(out / "nsa").eval()
    modules = list(nsa_modules(model).values())
    stream = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(8))
    length, trials, batch = 256, 6, 4
    rows = script.passkey_trials(stream, length, trials, seed=0)
    query = length - script.KEY_DIGITS - 1
    for layer, module in enumerate(modules):
        module.params = dataclasses.replace(module.params, window=100)
        block, groups = module.params.block_size, module.num_kv_heads
        calls = iter(range(0, trials, batch))

        def fake(q, k, layer=layer, block=block, groups=groups, calls=calls):
            first = next(calls)
            chosen = torch.full((q.shape[0], q.shape[2], groups, 3), -1, dtype=torch.long)
            for b, (_, stated) in enumerate(rows[first : first + q.shape[0]]):
                elsewhere = min(set(range(length // block)) - set((stated // block).tolist()))
                chosen[b, query] = elsewhere
                if layer == 0:
                    chosen[b, query, 0, 1] = stated[-1] // block
                elif first + b == 0:
                    chosen[b, query, :, 2] = stated[0] // block
            return chosen

        monkeypatch.setattr(module, "selected_blocks", fake)
    got = script.passkey(model, stream, length, trials, batch, torch.device("cpu"), seed=0)
    got = got["key_block_recall"]
    assert got["layers"] == pytest.approx([1 / modules[0].num_kv_heads, 1 / trials])
    assert got["any"] == 1.0
    reached = [int(stated.max()) >= query - 99 for _, stated in rows]
    assert 0 < sum(reached) < trials and got["in_window"] == pytest.approx(sum(reached) / trials)


def test_gates_at_answer_are_each_layers_mean_gates_of_the_answer_query(run):
    """Zero gate weights: every query's gates are the sigmoid of the bias, whatever the row."""
    out, _ = run
    model = nsa_convert.load(out / "nsa").eval()
    expected = []
    with torch.no_grad():
        for module in nsa_modules(model).values():
            module.gate.weight.zero_()
            module.gate.bias.normal_(0.0, 2.0)
            expected.append(torch.sigmoid(module.gate.bias).view(-1, 3).mean(0).tolist())
    stream = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(3))
    got = script.passkey(model, stream, 256, 5, 2, torch.device("cpu"), seed=0)["gates_at_answer"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected))


def test_warm_up_steps_train_only_the_new_parameters(run):
    out, _ = run
    model = nsa_convert.load(out / "nsa")
    nsa_convert.enable_checkpointing(
        model
    )  # as in the run: checkpointed layers must still pass NSA its gradients
    checkpointing = ("is_activation_checkpointing", "is_gradient_checkpointing")  # newer, older name
    assert getattr(model, next(name for name in checkpointing if hasattr(type(model), name)))
    new = {id(p) for m in nsa_modules(model).values() for p in m.parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stream = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(5))
    rows = script.training_rows(stream, 128, 2, 0.5, torch.Generator().manual_seed(6))

    def changed():
        return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}

    new_names = {name for name, p in model.named_parameters() if id(p) in new}
    script.train(model, rows, 2, 1e-3, 1e-3, torch.device("cpu"), {}, only_new=2)
    warmed = changed()
    assert warmed <= new_names and {n for n in new_names if n.endswith("gate.weight")} <= warmed
    assert all(p.requires_grad for p in model.parameters())
    script.train(model, rows, 1, 1e-3, 1e-3, torch.device("cpu"), {}, only_new=0)
    assert set(before) - new_names <= changed()


def test_a_variant_starts_from_the_pretrained_checkpoint(run, tmp_path):
    """--dense skips pretraining: the same dense model, evaluated alike, then converted and continued."""
    out, first = run
    args = ["--out", str(tmp_path), "--preset", "tiny", "--dense", str(out / "dense")]
    distill = ["--distill-selection", "0.5", "--distill-pool", "2"]
    results = script.main([*args, "--nsa-warmup-steps", "2", *distill, "--gate-lr", "0"])
    assert results["models"]["dense"] == first["models"]["dense"]
    assert results["models"]["nsa_converted"] == first["models"]["nsa_converted"]
    assert "pretrain" not in results["losses"] and "pretrain" not in results["seconds"]
    assert results["settings"]["nsa_warmup_steps"] == 2 and results["settings"]["dense"] == str(out / "dense")
    assert results["settings"]["distill_selection"] == 0.5 and results["settings"]["gate_lr"] == 0.0
    assert results["settings"]["distill_pool"] == 2
    assert (
        results["models"]["nsa_continued"]["gates_at_answer"]
        == first["models"]["nsa_converted"]["gates_at_answer"]
    )
    continued = results["losses"]["nsa_continued"]
    assert len(continued["distill"]) == len(continued["lm"]) == script.PRESETS["tiny"].continue_steps
    assert (
        all(kl > 0 for kl in continued["distill"]) and "distill" not in results["losses"]["dense_continued"]
    )
    assert set(results["software"]) >= {"torch", "transformers"}
    assert results["dense_model"] == first["dense_model"] == {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128,
    }  # fmt: skip
    with pytest.raises(SystemExit):
        script.parse_args([*args, "--pretrain-steps", "3"])
    assert not (tmp_path / "dense").exists() and (tmp_path / "nsa" / "config.json").exists()


def test_gate_cmp_logit_opens_the_compressed_gate_at_conversion(run, tmp_path):
    out, _ = run
    args = [
        "--out",
        str(tmp_path),
        "--preset",
        "tiny",
        "--dense",
        str(out / "dense"),
        "--continue-steps",
        "1",
    ]
    results = script.main([*args, "--gate-cmp-logit", "-2"])
    assert results["settings"]["gate_cmp_logit"] == -2.0
    for gates in results["models"]["nsa_converted"]["gates_at_answer"].values():
        assert all(layer[0] == pytest.approx(1 / (1 + math.exp(2)), rel=1e-5) for layer in gates)


def test_corpus_reads_the_python_files_under_its_roots(tmp_path):
    files = {f"a/m{i}.py": f"x = {i}\n".encode() * (i + 1) for i in range(40)}
    files |= {"a/__pycache__/c.py": b"cached", "b/site-packages/p.py": b"installed", "a/notes.txt": b"text"}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    train, val = script.corpus([tmp_path / "a", tmp_path / "b"])
    wanted = sorted(n for n in files if n.startswith("a/m"))
    held = [n for n in wanted if zlib.crc32(n.removeprefix("a/").encode()) % script.HELD_OUT == 0]
    assert 0 < len(held) < len(wanted)

    def stream(names):
        return [t for n in names for t in [*files[n], script.SEP]]

    assert val.tolist() == stream(held)
    assert train.tolist() == stream([n for n in wanted if n not in held])
    with pytest.raises(SystemExit, match="too few"):
        script.corpus([tmp_path / "b"])
