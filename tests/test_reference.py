"""The pure-PyTorch reference against the independent loop implementation and the spec's properties."""

import pytest
import torch
import torch.nn.functional as F
from naive_nsa import naive_nsa, naive_select, random_inputs

from nsa_convert import reference
from nsa_convert.spec import SparsityParams, num_compressed_blocks

# l = 8, d = 4, l' = 16, w = 24: T = 150 exceeds the window and n · l', and leaves 2 of 5 slots to importance.
SMALL = SparsityParams(block_size=16, top_n=5, window=24, compress_block=8, compress_stride=4)
# Other geometries: selection blocks smaller than compressed blocks, d = l, only the forced blocks.
GEOMETRIES = [
    SMALL,
    SparsityParams(block_size=8, top_n=4, window=10, compress_block=16, compress_stride=4),
    SparsityParams(block_size=8, top_n=6, window=7, compress_block=8, compress_stride=8),
    SparsityParams(block_size=16, top_n=3, window=24, compress_block=8, compress_stride=4),
]
HEADS = [(2, 2), (3, 1), (7, 1), (8, 2), (16, 1)]  # G = 1, 3, 7, 4 and MQA with 16 query heads


def resolved(params: SparsityParams, head_dim: int = 8) -> SparsityParams:
    return params.resolved(head_dim)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-300)).item()


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal GQA attention on (B, T, H, D) tensors."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2)


def forward(inputs: dict[str, torch.Tensor], params: SparsityParams):
    return reference.nsa_forward(**inputs, params=params)


def backward(grad_out, inputs, out, lse, indices, params):
    windows = {"k_win": inputs.get("k_win"), "v_win": inputs.get("v_win")}
    return reference.nsa_backward(
        grad_out, **{**inputs, **windows}, out=out, lse=lse, indices=indices, params=params
    )


@pytest.mark.parametrize(("q_heads", "kv_heads"), HEADS)
@pytest.mark.parametrize("seq_len", [1, 5, 37, 150])
def test_forward_matches_naive(rng, q_heads, kv_heads, seq_len):
    params = resolved(SMALL)
    inputs = random_inputs(rng, params, batch=2, seq_len=seq_len, q_heads=q_heads, kv_heads=kv_heads)
    out, lse, indices = forward(inputs, params)
    expected, expected_indices = naive_nsa(**inputs, params=params)
    assert out.dtype == torch.float64 and out.shape == expected.shape
    assert lse.dtype == torch.float32 and lse.shape == (*out.shape[:3], 3)
    assert torch.equal(indices, expected_indices)
    assert relative_error(out, expected) <= 1e-10


@pytest.mark.parametrize("params", GEOMETRIES[1:])
def test_forward_matches_naive_other_geometries(rng, params):
    params = resolved(params)
    inputs = random_inputs(rng, params, seq_len=75, q_heads=6, kv_heads=2)
    out, _, indices = forward(inputs, params)
    expected, expected_indices = naive_nsa(**inputs, params=params)
    assert torch.equal(indices, expected_indices)
    assert relative_error(out, expected) <= 1e-10


def test_forward_with_window_keys_matches_naive(rng):
    params = resolved(SMALL)
    inputs = random_inputs(rng, params, seq_len=90, q_heads=6, kv_heads=2, windows=True)
    out, _, _ = forward(inputs, params)
    expected, _ = naive_nsa(**inputs, params=params)
    assert relative_error(out, expected) <= 1e-10
    shared = {key: value for key, value in inputs.items() if key not in ("k_win", "v_win")}
    assert relative_error(forward(shared, params)[0], expected) > 1e-3  # the window keys are really used


def test_forward_float32_matches_naive(rng):
    params = resolved(SMALL)
    inputs = random_inputs(rng, params, seq_len=100, q_heads=4, kv_heads=1, dtype=torch.float32)
    out, _, indices = forward(inputs, params)
    expected, expected_indices = naive_nsa(**inputs, params=params)
    assert out.dtype == torch.float32
    assert torch.equal(indices, expected_indices)
    assert relative_error(out, expected) <= 1e-5


@pytest.mark.parametrize("params", GEOMETRIES)
@pytest.mark.parametrize("seq_len", [1, 6, 20, 63, 200])
def test_select_matches_naive(rng, params, seq_len):
    params = resolved(params)
    inputs = random_inputs(rng, params, batch=2, seq_len=seq_len, q_heads=6, kv_heads=2)
    indices = reference.select_blocks(inputs["q"], inputs["k_cmp"], params)
    assert indices.dtype == torch.long and indices.shape == (2, seq_len, 2, params.top_n)
    assert torch.equal(indices, naive_select(inputs["q"], inputs["k_cmp"], params))


def tied_compressed_keys(k_cmp: torch.Tensor, period: int) -> torch.Tensor:
    """Compressed keys repeating with `period`, so that whole runs of selection blocks tie in importance."""
    index = torch.arange(k_cmp.shape[1]) % period
    return k_cmp[:, index]


# Exact ties survive floating point only between blocks that sum the same probabilities in the same
# order: with l' ≥ l − d every non-forced candidate is fully visible, and a period dividing l'/d makes
# their eq. 9 terms identical sequences.
TIE_CASES = [
    (SMALL, 1),
    (SMALL, 2),
    (SMALL, 4),
    (SparsityParams(block_size=8, top_n=4, window=10, compress_block=8, compress_stride=4), 2),
    (SparsityParams(block_size=8, top_n=6, window=7, compress_block=8, compress_stride=8), 1),
]


@pytest.mark.parametrize(("params", "period"), TIE_CASES)
def test_select_ties_match_naive(rng, params, period):
    params = resolved(params)
    inputs = random_inputs(rng, params, seq_len=180, q_heads=4, kv_heads=2)
    k_cmp = tied_compressed_keys(inputs["k_cmp"], period)
    indices = reference.select_blocks(inputs["q"], k_cmp, params)
    assert torch.equal(indices, naive_select(inputs["q"], k_cmp, params))


def test_select_ties_go_to_lower_blocks(rng):
    """Identical compressed keys give every fully visible block the same importance: the lowest win."""
    params = resolved(SMALL)
    inputs = random_inputs(rng, params, seq_len=200, q_heads=4, kv_heads=2)
    indices = reference.select_blocks(inputs["q"], tied_compressed_keys(inputs["k_cmp"], 1), params)
    block = params.block_size
    for t in range(6 * block, 200):
        current = t // block
        assert indices[0, t, 0].tolist() == [0, 1, 2, current - 1, current], t


def test_select_few_candidates_and_forced_blocks(rng):
    params = resolved(SMALL)
    inputs = random_inputs(rng, params, seq_len=200, q_heads=4, kv_heads=2)
    indices = reference.select_blocks(inputs["q"], inputs["k_cmp"], params)
    block = params.block_size
    for t in range(200):
        current = t // block
        chosen = indices[0, t, 1]
        assert (chosen[: min(current + 1, params.top_n)] >= 0).all()
        assert (chosen[min(current + 1, params.top_n) :] == -1).all()
        assert {0, max(current - 1, 0), current} <= set(chosen.tolist())


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 2), (3, 3)])
def test_window_equals_dense_causal_when_sequence_fits(rng, q_heads, kv_heads):
    params = resolved(SMALL)
    inputs = random_inputs(rng, params, seq_len=params.window, q_heads=q_heads, kv_heads=kv_heads)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    o, lse = reference.window_attention(q, k, v, params)
    assert relative_error(o, dense_causal(q, k, v, params.scale)) <= 1e-12
    scores = (
        torch.einsum("bthd,bshd->bths", q, k.repeat_interleave(q_heads // kv_heads, dim=2)) * params.scale
    )
    causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()[None, :, None, :]
    expected_lse = torch.logsumexp(scores.masked_fill(~causal, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, expected_lse.float())


def test_selection_equals_dense_causal_when_sequence_fits(rng):
    params = resolved(SMALL)
    seq_len = params.top_n * params.block_size
    inputs = random_inputs(rng, params, seq_len=seq_len, q_heads=4, kv_heads=2)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    indices = reference.select_blocks(q, inputs["k_cmp"], params)
    o, _ = reference.selected_attention(q, k, v, indices, params)
    assert relative_error(o, dense_causal(q, k, v, params.scale)) <= 1e-12


def test_compressed_branch_is_empty_before_the_first_block(rng):
    params = resolved(SMALL)
    inputs = random_inputs(rng, params, seq_len=20, q_heads=4, kv_heads=2)
    o, lse = reference.compressed_attention(inputs["q"], inputs["k_cmp"], inputs["v_cmp"], params)
    first = params.compress_block - 1
    assert (o[:, :first] == 0).all() and torch.isneginf(lse[:, :first]).all()
    assert torch.isfinite(lse[:, first:]).all()
    short = random_inputs(rng, params, seq_len=params.compress_block - 1)
    o, lse = reference.compressed_attention(short["q"], short["k_cmp"], short["v_cmp"], params)
    assert short["k_cmp"].shape[1] == 0 and (o == 0).all() and torch.isneginf(lse).all()


def test_chunking_does_not_change_results(rng, monkeypatch):
    params = resolved(SMALL)
    inputs = random_inputs(rng, params, batch=2, seq_len=130, q_heads=6, kv_heads=2, windows=True)
    out, lse, indices = forward(inputs, params)
    grad_out = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    grads = backward(grad_out, inputs, out, lse, indices, params)
    monkeypatch.setattr(reference, "MAX_CHUNK_SCORES", 200)
    chunked_out, chunked_lse, chunked_indices = forward(inputs, params)
    assert torch.equal(chunked_indices, indices)
    torch.testing.assert_close(chunked_out, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked_lse, lse)
    chunked = backward(grad_out, inputs, out, lse, indices, params)
    for expected, actual in zip(grads, chunked, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("windows", [False, True])
@pytest.mark.parametrize(("q_heads", "kv_heads", "seq_len"), [(6, 2, 130), (3, 1, 5), (4, 4, 1)])
def test_backward_matches_autograd(rng, windows, q_heads, kv_heads, seq_len):
    """The hand-written backward against autograd through the (differentiable) forward."""
    params = resolved(SMALL)
    inputs = random_inputs(rng, params, seq_len=seq_len, q_heads=q_heads, kv_heads=kv_heads, windows=windows)
    leaves = {key: value.clone().requires_grad_() for key, value in inputs.items()}
    out, lse, indices = forward(leaves, params)
    grad_out = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    expected = torch.autograd.grad(out, list(leaves.values()), grad_out, materialize_grads=True)
    grads = backward(grad_out, inputs, out, lse, indices, params)
    names = ["q", "k", "v", "k_cmp", "v_cmp", "gates", "k_win", "v_win"]
    actual = dict(zip(names, grads, strict=True))
    if not windows:
        assert actual.pop("k_win") is None and actual.pop("v_win") is None
    for name, want in zip(leaves, expected, strict=True):
        torch.testing.assert_close(actual[name], want, rtol=1e-10, atol=1e-12, msg=name)


def test_bfloat16_is_close_to_float32(rng):
    params = resolved(SMALL)
    inputs = random_inputs(rng, params, seq_len=100, q_heads=4, kv_heads=2, dtype=torch.bfloat16)
    out, lse, indices = forward(inputs, params)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    widened = {key: value.float() for key, value in inputs.items()}
    out32, lse32, indices32 = forward(widened, params)
    assert torch.equal(indices, indices32)
    torch.testing.assert_close(out.float(), out32, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, lse32)
    grads = backward(torch.ones_like(out), inputs, out, lse, indices, params)
    grads32 = backward(torch.ones_like(out32), widened, out32, lse32, indices32, params)
    for grad, grad32, name in zip(grads[:6], grads32[:6], inputs, strict=True):
        assert grad.dtype == torch.bfloat16, name
        torch.testing.assert_close(grad.float(), grad32, rtol=5e-2, atol=5e-2, msg=name)


def test_scale_must_be_resolved(rng):
    inputs = random_inputs(rng, SMALL, seq_len=12)
    with pytest.raises(ValueError, match="resolved"):
        reference.nsa_forward(**inputs, params=SMALL)


def test_shapes_follow_the_geometry(rng):
    params = resolved(SMALL)
    inputs = random_inputs(rng, params, batch=3, seq_len=41, q_heads=6, kv_heads=3, head_dim=8, value_dim=5)
    assert inputs["k_cmp"].shape[1] == num_compressed_blocks(
        41, params.compress_block, params.compress_stride
    )
    out, lse, indices = forward(inputs, params)
    assert out.shape == (3, 41, 6, 5) and lse.shape == (3, 41, 6, 3) and indices.shape == (3, 41, 3, 5)
