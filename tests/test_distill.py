"""Selection distillation: its target and importance against float64 loops, its gradient, and training."""

from __future__ import annotations

import math

import pytest
import torch

import nsa_convert
from nsa_convert import enable_selection_distillation, selection_distillation_loss
from nsa_convert.api import nsa_modules
from nsa_convert.nn import distill
from nsa_convert.nn.compression import BlockCompressor
from nsa_convert.nn.distill import (
    block_attention_mass,
    compressed_importance,
    distillation_term,
    first_ranked_position,
    retrieval_focus,
    sample_positions,
    selection_kl,
)
from nsa_convert.spec import SparsityParams
from tests.models import VOCAB
from tests.naive_nsa import naive_importance

PARAMS = SparsityParams(block_size=16, top_n=4, window=32, compress_block=8, compress_stride=4).resolved(16)


def _sequence(rng: torch.Generator, seq_len: int = 150, heads: int = 6, kv_heads: int = 2):
    q = torch.randn(seq_len, heads, 16, generator=rng, dtype=torch.float64)
    k = torch.randn(seq_len, kv_heads, 16, generator=rng, dtype=torch.float64)
    k_cmp = torch.randn((seq_len - 8) // 4 + 1, kv_heads, 16, generator=rng, dtype=torch.float64)
    positions = torch.tensor([first_ranked_position(PARAMS), 97, seq_len - 1])
    return q, k, k_cmp, positions


def _naive_mass(q: torch.Tensor, k: torch.Tensor, t: int, group: int) -> list[float]:
    """Full causal attention's mass per selection block for one KV group's query heads at t."""
    blocks = [0.0] * -(-k.shape[0] // PARAMS.block_size)
    for head in q:
        weights = torch.softmax(PARAMS.scale * (k[: t + 1] @ head), dim=0)
        for key, weight in enumerate(weights.tolist()):
            blocks[key // PARAMS.block_size] += weight / group
    return blocks


def test_target_and_importance_match_float64_loops(rng):
    q, k, k_cmp, positions = _sequence(rng)
    group = q.shape[1] // k.shape[1]
    mass = block_attention_mass(q[positions], k, positions, PARAMS)
    importance = compressed_importance(q[positions], k_cmp, positions, mass.shape[-1], PARAMS)
    for row, t in enumerate(positions.tolist()):
        for h in range(k.shape[1]):
            heads = q[t, h * group : (h + 1) * group]
            expected = torch.tensor(_naive_mass(heads, k[:, h], t, group), dtype=torch.float32)
            torch.testing.assert_close(mass[row, h], expected, rtol=1e-5, atol=1e-6)
            naive = naive_importance(heads, k_cmp[:, h], t, PARAMS)
            expected = torch.zeros(mass.shape[-1])
            expected[: len(naive)] = torch.tensor(naive)
            torch.testing.assert_close(importance[row, h], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_scores", [1 << 24, 6 * 150])  # one chunk; one position per chunk
def test_kl_compares_the_ranked_blocks_only(rng, monkeypatch, chunk_scores):
    monkeypatch.setattr(distill, "MAX_CHUNK_SCORES", chunk_scores)
    q, k, k_cmp, positions = _sequence(rng)
    kl = selection_kl(q, k, k_cmp, positions, PARAMS)
    mass = block_attention_mass(q[positions], k, positions, PARAMS).double()
    importance = compressed_importance(q[positions], k_cmp, positions, mass.shape[-1], PARAMS).double()
    for row, t in enumerate(positions.tolist()):
        ranked = slice(1, t // PARAMS.block_size - 1)  # not block 0, the previous or the current one
        for h in range(k.shape[1]):
            p = mass[row, h, ranked] / mass[row, h, ranked].sum()
            s = importance[row, h, ranked] / importance[row, h, ranked].sum()
            expected = float((p * (p / s).log()).sum())
            assert math.isclose(float(kl[row, h]), expected, rel_tol=1e-4, abs_tol=1e-6)
    assert (kl > 0).all()


@pytest.mark.parametrize("chunk_scores", [1 << 24, 6 * 150])  # one chunk; one position per chunk
def test_retrieval_focus_is_the_peak_over_the_mean_distant_block_mass(rng, monkeypatch, chunk_scores):
    monkeypatch.setattr(distill, "MAX_CHUNK_SCORES", chunk_scores)
    q, k, _, _ = _sequence(rng)
    positions = torch.tensor([first_ranked_position(PARAMS), 97, 131, 149])
    group = q.shape[1] // k.shape[1]
    q[131] = 6 * k[40].repeat_interleave(group, dim=0)  # every head attends to one key, in block 2
    focus = retrieval_focus(q, k, positions, PARAMS)
    expected = []
    for t in positions.tolist():
        # ranked (1 … ⌊t/l'⌋ − 2) and wholly before the window
        distant = [
            j
            for j in range(1, t // PARAMS.block_size - 1)
            if (j + 1) * PARAMS.block_size <= t - PARAMS.window + 1
        ]
        best = 0.0
        for h in range(k.shape[1]):
            mass = _naive_mass(q[t, h * group : (h + 1) * group], k[:, h], t, group)
            if len(distant) >= 2:
                masses = [mass[j] for j in distant]
                best = max(best, max(masses) / (sum(masses) / len(masses)))
        expected.append(best)
    # t = 64 has one distant block; t = 131 has five, and its attention is nearly all on one of them
    assert expected[0] == 0.0 and 4 < expected[2] <= 5 and max(expected[1], expected[3]) < expected[2]
    torch.testing.assert_close(focus, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=0)


def test_a_pool_scores_the_queries_that_retrieve(rng):
    """Queries planted to attend to one distant key are the ones a large pool keeps: the term equals the
    mean KL at exactly those positions, wherever they lie among the documents."""
    q, k, _, _ = _sequence(rng, seq_len=300)
    k_raw = torch.randn(300, 2, 16, generator=rng, dtype=torch.float64)
    documents = [(0, 150), (150, 150)]
    planted = {0: [101, 138], 1: [97]}  # positions within each document
    for doc, spots in planted.items():
        start = documents[doc][0]
        for t in spots:
            key = start + 20 + t % 9  # in block 1: ranked for every planted position
            q[start + t] = 6 * k[key].repeat_interleave(q.shape[1] // k.shape[1], dim=0)
    compressor = BlockCompressor(16, PARAMS.compress_block, PARAMS.compress_stride).double()
    with torch.no_grad():  # away from the block mean, so that importance and target differ
        compressor.fc1.weight.normal_(0.0, 0.05, generator=rng)

    torch.manual_seed(3)
    term = distillation_term(q, k, k_raw, documents, 3, compressor, PARAMS, pool=1000)
    expected = []
    for (start, _), spots in zip(documents, planted.values(), strict=True):
        span = slice(start, start + max(spots) + 1)
        k_cmp = compressor(k_raw[span][None])[0]
        expected.append(selection_kl(q[span], k[span], k_cmp, torch.tensor(spots), PARAMS))
    torch.testing.assert_close(term, torch.cat(expected).mean(), rtol=1e-6, atol=0)

    torch.manual_seed(3)  # pool 1: the uniform draw, as without a pool
    uniform = distillation_term(q, k, k_raw, documents, 3, compressor, PARAMS)
    torch.manual_seed(3)
    assert torch.equal(uniform, distillation_term(q, k, k_raw, documents, 3, compressor, PARAMS, pool=1))
    assert not torch.isclose(uniform, term)


def test_sampled_positions_are_distinct_ranked_and_spread_over_documents():
    torch.manual_seed(0)
    first = first_ranked_position(PARAMS)
    lengths = [first - 5, first + 40, 10, first + 200]
    positions = sample_positions(lengths, 100, PARAMS)
    assert positions[0].numel() == 0 and positions[2].numel() == 0
    assert sum(p.numel() for p in positions) == 100
    for length, at in zip(lengths, positions, strict=True):
        assert torch.equal(at, at.unique()) and ((at >= first) & (at < length)).all()
    assert positions[3].numel() > positions[1].numel() > 0
    assert sum(p.numel() for p in sample_positions(lengths, 10_000, PARAMS)) == 240


def _term_and_grads(model, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    model(input_ids=ids, use_cache=False, **kwargs)
    term = selection_distillation_loss(model)
    term.backward()
    # a checkpointed layer recomputes its term inside backward: it must not be kept (graph and all)
    assert all(module.distill_term is None for module in nsa_modules(model).values())
    return term.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_reaches_only_the_key_compressors(small_converted, rng):
    model = nsa_convert.load(small_converted, dtype=torch.float64)
    enable_selection_distillation(model, queries=16)
    ids = torch.randint(0, VOCAB, (2, 140), generator=rng)
    term, grads = _term_and_grads(model, ids)
    assert term > 0
    assert grads and all(".nsa.compress_k." in name for name in grads)
    layers = {name.split(".nsa.")[0] for name in grads}
    assert layers == set(nsa_modules(model))
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if name.endswith("fc1.weight"))


@pytest.mark.parametrize("pool", [1, 4])
def test_term_is_the_same_packed_left_padded_and_under_checkpointing(small_converted, rng, pool):
    model = nsa_convert.load(small_converted, dtype=torch.float64)
    enable_selection_distillation(model, queries=8, pool=pool)
    assert all(layer.distill_pool == pool for layer in nsa_modules(model).values())
    ids = torch.randint(0, VOCAB, (1, 130), generator=rng)
    term, grads = _term_and_grads(model, ids)

    pad = 7  # the same row after padding: its positions are its own, so the same ones are sampled
    padded = torch.cat([torch.zeros(1, pad, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    rotary = (mask.cumsum(1) - 1).clamp_min(0)  # φ_K is not shift-invariant: the same rotary positions
    padded_term, padded_grads = _term_and_grads(model, padded, attention_mask=mask, position_ids=rotary)
    # packed: the row followed by a document too short to be sampled from
    packed = torch.cat([ids, torch.randint(0, VOCAB, (1, 20), generator=rng)], dim=1)
    positions = torch.cat([torch.arange(130), torch.arange(20)])[None]
    packed_term, packed_grads = _term_and_grads(model, packed, position_ids=positions)

    nsa_convert.enable_checkpointing(model)
    model.train()
    checkpointed_term, checkpointed_grads = _term_and_grads(model, ids)
    for other, other_grads in (
        (padded_term, padded_grads),
        (packed_term, packed_grads),
        (checkpointed_term, checkpointed_grads),
    ):
        torch.testing.assert_close(other, term)
        assert other_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, msg=name)


def test_a_pool_reaches_the_layers(small_converted, rng):
    """The same draw of positions, scored uniformly and through a pool: a different term."""
    model = nsa_convert.load(small_converted, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (1, 140), generator=rng)
    terms = []
    for pool in (1, 4):
        enable_selection_distillation(model, queries=4, pool=pool)
        terms.append(_term_and_grads(model, ids)[0])
    assert not torch.isclose(terms[0], terms[1])


def test_training_the_compressors_on_it_lowers_it(small_converted, rng):
    model = nsa_convert.load(small_converted, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 160), generator=rng)
    enable_selection_distillation(model, queries=1000)  # every ranked position: a fixed objective

    def evaluate() -> float:
        model(input_ids=ids, use_cache=False)
        return selection_distillation_loss(model).item()

    compressors = [p for m in nsa_modules(model).values() for p in m.compress_k.parameters()]
    optimizer = torch.optim.Adam(compressors, lr=1e-2)
    before = evaluate()
    for _ in range(40):
        model(input_ids=ids, use_cache=False)
        selection_distillation_loss(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert evaluate() < 0.7 * before


def test_misuse_fails_with_a_clear_message(small_converted, rng):
    model = nsa_convert.load(small_converted, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="distillation is off"):
        selection_distillation_loss(model)
    enable_selection_distillation(model, queries=4)
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, 90), generator=rng), use_cache=False)
    with pytest.raises(RuntimeError, match="gradients"):
        selection_distillation_loss(model)
    with pytest.raises(ValueError, match="no NSA layers"):
        enable_selection_distillation(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pool"):
        enable_selection_distillation(model, queries=4, pool=0)
