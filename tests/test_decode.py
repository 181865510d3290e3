"""Decoding: the reference decode path, the decode op, the Triton decode kernels and the NSA cache layer.

The spec's property is the oracle throughout: decoding the last n tokens of a sequence gives the rows the
full-sequence computation gives there.  Batches hold sequences of different lengths, right-aligned in the
cache as left padding leaves them; T crosses compression (l) and selection (l') block boundaries.
"""

from __future__ import annotations

import copy

import pytest
import torch
from naive_nsa import naive_nsa

from nsa_convert import ops, reference
from nsa_convert.kernels import buffers
from nsa_convert.kernels import compress as compress_kernels
from nsa_convert.kernels import decode as kernels
from nsa_convert.nn.cache import ROUND, NSACacheLayer, _Timeline
from nsa_convert.nn.compression import BlockCompressor
from nsa_convert.spec import SparsityParams, num_compressed_blocks

# l = 8, d = 4, l' = 16, n = 4, w = 24: a few dozen tokens cross every boundary.
GEOMETRY = dict(block_size=16, top_n=4, window=24, compress_block=8, compress_stride=4)
PARAMS = SparsityParams(**GEOMETRY)
NAMES = ("q", "k", "v", "k_cmp", "v_cmp", "gates")


pytestmark = pytest.mark.usefixtures("one_thread")


def sequence(rng, length, q_heads, kv_heads, dim, dtype=torch.float64, params=PARAMS, windows=False):
    """Random full-sequence inputs of one sequence (batch 1), keyed like nsa_forward's arguments."""

    def randn(*shape):
        return torch.randn(*shape, generator=rng, dtype=torch.float64).to(dtype)

    num_cmp = num_compressed_blocks(length, params.compress_block, params.compress_stride)
    x = {
        "q": randn(1, length, q_heads, dim),
        "k": randn(1, length, kv_heads, dim),
        "v": randn(1, length, kv_heads, dim),
        "k_cmp": randn(1, num_cmp, kv_heads, dim),
        "v_cmp": randn(1, num_cmp, kv_heads, dim),
        "gates": torch.rand(1, length, q_heads, 3, generator=rng, dtype=torch.float64).to(dtype),
    }
    if windows:
        x["k_win"], x["v_win"] = randn(1, length, kv_heads, dim), randn(1, length, kv_heads, dim)
    return x


def batch_cache(rng, sequences, n, params, keep_window=None):
    """Decode inputs for the last n tokens of each sequence: raw caches right-aligned (left-padded with
    random garbage), compressed ones left-aligned (garbage after each sequence's blocks)."""
    lengths = [x["q"].shape[1] for x in sequences]
    width = max(lengths)
    tc = max(x["k_cmp"].shape[1] for x in sequences)

    def right(name):
        rows = []
        for x in sequences:
            t = x[name]
            pad = torch.randn(1, width - t.shape[1], *t.shape[2:], generator=rng, dtype=torch.float64)
            rows.append(torch.cat([pad.to(t.dtype), t], dim=1))
        return torch.cat(rows)

    def left(name):
        rows = []
        for x in sequences:
            t = x[name]
            pad = torch.randn(1, tc - t.shape[1], *t.shape[2:], generator=rng, dtype=torch.float64)
            rows.append(torch.cat([t, pad.to(t.dtype)], dim=1))
        return torch.cat(rows)

    inputs = {
        "q": torch.cat([x["q"][:, -n:] for x in sequences]),
        "k": right("k"),
        "v": right("v"),
        "k_cmp": left("k_cmp"),
        "v_cmp": left("v_cmp"),
        "gates": torch.cat([x["gates"][:, -n:] for x in sequences]),
        "seq_lens": torch.tensor(lengths),
    }
    if "k_win" in sequences[0]:
        inputs["k_win"], inputs["v_win"] = right("k_win"), right("v_win")
        if keep_window is not None:
            inputs["k_win"], inputs["v_win"] = (
                inputs["k_win"][:, -keep_window:],
                inputs["v_win"][:, -keep_window:],
            )
    return inputs


def full_rows(sequences, n, params):
    """nsa_forward on each whole sequence, last n rows: (out, lse, indices) batched."""
    outs = [reference.nsa_forward(**x, params=params) for x in sequences]
    return tuple(torch.cat([o[i][:, -n:] for o in outs]) for i in range(3))


def decode_args(inputs):
    return [inputs[name] for name in (*NAMES, "seq_lens")]


def windows_of(inputs):
    return {name: inputs[name] for name in ("k_win", "v_win") if name in inputs}


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "lengths", "n"),
    [(4, 2, [7, 8, 9], 1), (6, 2, [15, 16, 17, 33], 1), (3, 1, [48, 31, 64], 3), (2, 2, [40, 5], 4)],
)
@pytest.mark.parametrize("separate_windows", [False, True])
def test_reference_decode_equals_full_sequence(rng, q_heads, kv_heads, lengths, n, separate_windows):
    params = PARAMS.resolved(8)
    sequences = [sequence(rng, t, q_heads, kv_heads, 8, windows=separate_windows) for t in lengths]
    keep = params.window + n - 1 if separate_windows else None
    inputs = batch_cache(rng, sequences, n, params, keep_window=keep)
    out, lse, indices = reference.nsa_decode(*decode_args(inputs), params, **windows_of(inputs))
    expected_out, expected_lse, expected_indices = full_rows(sequences, n, params)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-12)


def test_reference_decode_matches_naive(rng):
    params = PARAMS.resolved(8)
    x = sequence(rng, 45, 4, 2, 8)
    expected, expected_indices = naive_nsa(**x, params=params)
    inputs = batch_cache(rng, [x], 2, params)
    out, _, indices = reference.nsa_decode(*decode_args(inputs), params)
    assert torch.equal(indices, expected_indices[:, -2:])
    torch.testing.assert_close(out, expected[:, -2:], rtol=1e-10, atol=1e-12)


def test_padding_queries_give_zero(rng):
    params = PARAMS.resolved(8)
    long, short = sequence(rng, 20, 2, 1, 8), sequence(rng, 2, 2, 1, 8)
    inputs = batch_cache(rng, [long, short], 1, params)
    inputs["q"] = torch.cat([long["q"][:, -4:], torch.randn(1, 4, 2, 8, generator=rng, dtype=torch.float64)])
    inputs["gates"] = torch.rand(2, 4, 2, 3, generator=rng, dtype=torch.float64)
    inputs["seq_lens"] = torch.tensor([20, 2])
    out, lse, indices = reference.nsa_decode(*decode_args(inputs), params)
    assert torch.equal(out[1, :2], torch.zeros_like(out[1, :2])) and (indices[1, :2] == -1).all()
    assert torch.isinf(lse[1, :2]).all() and torch.isfinite(out).all()


def _nan_outside_sequences(inputs, params):
    """The inputs with NaN in every left-padding row and every compressed entry past a sequence's blocks:
    what a cache's uninitialised growth may hold there."""
    poisoned = dict(inputs)
    lengths = inputs["seq_lens"].tolist()
    for name in ("k", "v", "k_win", "v_win"):
        if name in inputs:
            x = inputs[name].clone()
            for b, length in enumerate(lengths):
                x[b, : max(0, x.shape[1] - length)] = float("nan")
            poisoned[name] = x
    for name in ("k_cmp", "v_cmp"):
        x = inputs[name].clone()
        for b, length in enumerate(lengths):
            x[b, num_compressed_blocks(length, params.compress_block, params.compress_stride) :] = float(
                "nan"
            )
        poisoned[name] = x
    return poisoned


@pytest.mark.parametrize("implementation", [reference, kernels])
def test_decode_never_reads_padding_or_compressed_slack(rng, implementation):
    params = SparsityParams(**GEOMETRY).resolved(16)
    sequences = [sequence(rng, t, 4, 2, 16, torch.float32, windows=True) for t in (41, 18, 9)]
    inputs = batch_cache(rng, sequences, 2, params)
    expected, _, _ = reference.nsa_decode(*decode_args(inputs), params, **windows_of(inputs))
    poisoned = _nan_outside_sequences(inputs, params)
    out, _, _ = implementation.nsa_decode(*decode_args(poisoned), params, **windows_of(poisoned))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_op_checks_and_traces(rng):
    params = PARAMS.resolved(8)
    inputs = batch_cache(rng, [sequence(rng, 30, 4, 2, 8), sequence(rng, 21, 4, 2, 8)], 2, params)
    args = decode_args(inputs)
    out, lse, indices = ops.nsa_decode_with_stats(*args, **GEOMETRY, backend="reference")
    expected = reference.nsa_decode(*args, params)
    assert torch.equal(out, expected[0]) and torch.equal(indices, expected[2])
    assert lse.dtype == torch.float32 and indices.dtype == torch.int64
    config = (*GEOMETRY.values(), float(params.scale), "reference")
    torch.library.opcheck(ops._nsa_decode_op, (*args, None, None, *config))
    meta = [x.to("meta") for x in args]
    out, lse, indices = ops._nsa_decode_op(*meta, None, None, *config)
    assert out.shape == (2, 2, 4, 8) and lse.shape == (2, 2, 4, 3) and indices.shape == (2, 2, 2, 4)


def test_decode_op_rejects_bad_inputs(rng):
    params = PARAMS.resolved(8)
    good = batch_cache(rng, [sequence(rng, 30, 4, 2, 8)], 1, params)
    cases = [
        ({"q": good["q"][0]}, "q must have 4 dimensions"),
        ({"k": good["k"][:, :, :1]}, "has shape"),
        ({"v_cmp": good["v_cmp"][..., :-1]}, "v_cmp has shape"),
        ({"gates": good["gates"][..., :2]}, "gates has shape"),
        ({"seq_lens": good["seq_lens"].float()}, "seq_lens"),
        ({"seq_lens": torch.tensor([30, 30])}, "seq_lens"),
        ({"k_win": good["k"]}, "k_win and v_win"),
        ({"v": good["v"].float()}, "dtype"),
    ]
    for overrides, message in cases:
        arguments = {**good, **overrides}
        tensors = [arguments.pop(name) for name in (*NAMES, "seq_lens")]
        with pytest.raises(ValueError, match=message):
            ops.nsa_decode(*tensors, **arguments, **GEOMETRY)


KERNEL_CASES = [
    # (Hq, Hkv, lengths, n): G = 1, 3, 4, 7, 16; n·G past MAX_ROWS splits the new tokens into chunks.
    (2, 2, [40, 9], 1),
    (3, 1, [57, 64, 33], 2),
    (4, 1, [100, 17], 1),
    (7, 1, [65, 80], 3),
    (16, 1, [70, 47], 5),
]


@pytest.mark.parametrize("late_window", [0, 1])
@pytest.mark.parametrize(("q_heads", "kv_heads", "lengths", "n"), KERNEL_CASES)
def test_kernels_match_reference(rng, monkeypatch, q_heads, kv_heads, lengths, n, late_window):
    """Also with the window in the slot launch, in spans of two 16-key tiles (sequences shorter than the
    window, a separate window cache cut to what the step needs)."""
    monkeypatch.setattr(buffers, "POISON", True)
    if late_window:
        monkeypatch.setattr(kernels, "LATE_WINDOW", 1)
        monkeypatch.setattr(kernels, "BW", 16)
        monkeypatch.setattr(kernels, "WIN_SPAN", 32)
    params = SparsityParams(**GEOMETRY).resolved(16)
    separate = q_heads == 7
    sequences = [sequence(rng, t, q_heads, kv_heads, 16, torch.float32, windows=separate) for t in lengths]
    keep = params.window + n - 1 if separate else None
    inputs = batch_cache(rng, sequences, n, params, keep_window=keep)
    out, lse, indices = kernels.nsa_decode(*decode_args(inputs), params, **windows_of(inputs))
    expected_out, expected_lse, expected_indices = reference.nsa_decode(
        *decode_args(inputs), params, **windows_of(inputs)
    )
    assert torch.equal(indices, expected_indices)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    finite = expected_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    torch.testing.assert_close(lse[finite], expected_lse[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "geometry",
    [
        GEOMETRY,  # l'/d = 4, l/d = 2: one term of each block's span lies in the tile before
        dict(block_size=12, top_n=5, window=20, compress_block=12, compress_stride=4),  # l'/d = 3
        dict(block_size=8, top_n=3, window=16, compress_block=16, compress_stride=4),  # span 2 blocks back
        # Peaked softmax (scale 1): tile maxima differ, so a plane read against the wrong tile's maximum
        # changes the ranking.
        dict(block_size=8, top_n=8, window=16, compress_block=16, compress_stride=4, scale=1.0),
        dict(block_size=16, top_n=8, window=24, compress_block=8, compress_stride=4, scale=1.0),
        dict(block_size=4, top_n=6, window=16, compress_block=16, compress_stride=4),  # l'/d = 1
        dict(block_size=16, top_n=4, window=24, compress_block=4, compress_stride=4),  # l/d = 1
    ],
)
def test_kernels_with_small_tiles_match_reference(rng, monkeypatch, geometry):
    """Tiles shrunk so that a few hundred tokens cross compressed tiles, splits and ranked parts."""
    _check_small_tiles(rng, monkeypatch, geometry, 4, 1, (290, 163, 40), 2)


@pytest.mark.parametrize(
    ("gather", "late_window", "win_span"), [(1, 0, 16), (2, 0, 32), (2, 1, 16), (2, 1, 32)]
)
def test_kernels_with_small_tiles_and_chunks_match_reference(rng, monkeypatch, gather, late_window, win_span):
    """Several ranked parts, merged by their last program, in each of two chunks of new tokens (G = 16); the
    slot programs' blocks gathered into one tile or taken one after the other (top n odd: a slot left empty);
    the window's 16-key tiles one or two per program (43 keys per chunk: 3 spans of one, or 2 of up to
    two), in the compressed launch or in the slot launch."""
    monkeypatch.setattr(kernels, "GATHER", gather)
    monkeypatch.setattr(kernels, "LATE_WINDOW", late_window)
    monkeypatch.setattr(kernels, "BW", 16)
    monkeypatch.setattr(kernels, "WIN_SPAN", win_span)
    geometry = dict(block_size=12, top_n=5, window=40, compress_block=12, compress_stride=4)
    _check_small_tiles(rng, monkeypatch, geometry, 32, 2, (290, 163), 5)


def test_window_span_must_be_whole_tiles(rng, monkeypatch):
    monkeypatch.setattr(kernels, "BW", 16)
    monkeypatch.setattr(kernels, "WIN_SPAN", 24)
    params = SparsityParams(**GEOMETRY).resolved(16)
    inputs = batch_cache(rng, [sequence(rng, 40, 4, 1, 16, torch.float32)], 1, params)
    with pytest.raises(ValueError, match="multiple of BW"):
        kernels.nsa_decode(*decode_args(inputs), params)


def _check_small_tiles(rng, monkeypatch, geometry, q_heads, kv_heads, lengths, n):
    monkeypatch.setattr(buffers, "POISON", True)
    monkeypatch.setattr(kernels, "BC", 16)
    monkeypatch.setattr(kernels, "PART", 16)
    monkeypatch.setattr(kernels, "MAX_PARTS", 4)
    params = SparsityParams(**geometry).resolved(16)
    sequences = [sequence(rng, t, q_heads, kv_heads, 16, torch.float32, params=params) for t in lengths]
    inputs = batch_cache(rng, sequences, n, params)
    out, lse, indices = kernels.nsa_decode(*decode_args(inputs), params)
    expected_out, expected_lse, expected_indices = reference.nsa_decode(*decode_args(inputs), params)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_kernels_equal_full_sequence_across_boundaries(rng):
    """The spec's property on the kernels: decode at T = l − 1 … past 2·l' + d equals nsa_forward's row."""
    params = SparsityParams(**GEOMETRY).resolved(16)
    x = sequence(rng, 40, 4, 1, 16, torch.float32)
    full_out, _, full_indices = reference.nsa_forward(**{k: v.double() for k, v in x.items()}, params=params)
    lengths = [7, 8, 9, 15, 16, 17, 31, 32, 33, 36, 40]
    sequences = [{name: t[:, :length] for name, t in x.items()} for length in lengths]
    for seq, length in zip(sequences, lengths, strict=True):
        num_cmp = num_compressed_blocks(length, params.compress_block, params.compress_stride)
        seq["k_cmp"], seq["v_cmp"] = x["k_cmp"][:, :num_cmp], x["v_cmp"][:, :num_cmp]
    inputs = batch_cache(rng, sequences, 1, params)
    out, _, indices = ops.nsa_decode_with_stats(*decode_args(inputs), **GEOMETRY, backend="triton")
    rows = torch.tensor(lengths) - 1
    assert torch.equal(indices[:, 0], full_indices[0, rows])
    torch.testing.assert_close(out[:, 0].double(), full_out[0, rows], rtol=1e-5, atol=1e-5)


def compressors(dim, params, seed=0):
    torch.manual_seed(seed)
    pair = [BlockCompressor(dim, params.compress_block, params.compress_stride) for _ in range(2)]
    for module in pair:
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.3)
    return pair


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("independent", [False, True])
def test_cache_layer_extends_compressed_blocks_incrementally(rng, independent, backend):
    """Prefill, then decode steps of 1 and 3 tokens: the compressed cache equals φ over each sequence, the
    raw views hold each sequence right-aligned, and the independent branches keep only w − 1 / l − 1 past.
    The Triton backend (one fused launch per φ) must write exactly the blocks completed, nothing else."""
    params, heads, dim = PARAMS, 2, 4
    m = 3 if independent else 1
    layer = NSACacheLayer(heads, independent, params)
    compress_k, compress_v = compressors(dim, params)
    pads = torch.tensor([0, 5, 14])  # the last has no compressed block at the prefill
    total = 70
    keys = torch.randn(3, m * heads, total, dim, generator=rng)
    values = torch.randn(3, m * heads, total, dim, generator=rng)
    prefill = 20
    layer.update(keys[:, :, :prefill], values[:, :, :prefill])
    assert not layer.decoding
    cmp_branch = slice(heads, 2 * heads) if independent else slice(0, heads)
    slc_branch = slice(2 * heads, 3 * heads) if independent else slice(0, heads)

    width = num_compressed_blocks(prefill, params.compress_block, params.compress_stride)
    k_cmp = torch.randn(3, width, heads, dim, generator=rng)
    v_cmp = torch.randn(3, width, heads, dim, generator=rng)
    for b, pad in enumerate(pads.tolist()):
        own = keys[b : b + 1, cmp_branch, pad:prefill].transpose(1, 2)
        own_v = values[b : b + 1, cmp_branch, pad:prefill].transpose(1, 2)
        with torch.no_grad():
            count = num_compressed_blocks(prefill - pad, params.compress_block, params.compress_stride)
            k_cmp[b, :count] = compress_k(own)[0]
            v_cmp[b, :count] = compress_v(own_v)[0]
    layer.start(pads, k_cmp, v_cmp)
    end = prefill
    for step in [1, 1, 3, 1, 9, 1, 1, 13] * 4:  # steps of 9 and 13 complete several blocks (d = 4)
        if end + step > total:
            break
        layer.update(keys[:, :, end : end + step], values[:, :, end : end + step])
        end += step
        assert layer.decoding and layer.get_seq_length() == end
        held = [x.nan_to_num().clone() for x in layer.compressed_kv()]
        layer.extend_compressed(compress_k, compress_v, backend)
        assert torch.equal(layer.seq_lens(), end - pads.int())
        got_k, got_v = layer.compressed_kv()
        sel_k, _ = layer.selection_kv()
        assert torch.equal(sel_k, keys[:, slc_branch, :end].transpose(1, 2))
        for b, pad in enumerate(pads.tolist()):
            own_k = keys[b : b + 1, cmp_branch, pad:end].transpose(1, 2)
            own_v = values[b : b + 1, cmp_branch, pad:end].transpose(1, 2)
            count = num_compressed_blocks(end - pad, params.compress_block, params.compress_stride)
            with torch.no_grad():
                torch.testing.assert_close(got_k[b, :count], compress_k(own_k)[0], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(got_v[b, :count], compress_v(own_v)[0], rtol=1e-5, atol=1e-6)
            for was, now in zip(held, (got_k, got_v), strict=True):
                # Slots past a sequence's own blocks (others have more) are never written.
                assert torch.equal(now[b, count : was.shape[1]].nan_to_num(), was[b, count:])
        if independent:
            win_k, _ = layer.window_kv()
            assert min(end, params.window - 1 + step) <= win_k.shape[1] <= end
            assert torch.equal(win_k, keys[:, :heads, end - win_k.shape[1] : end].transpose(1, 2))
    raw = sum(x[:, :, :end].numel() * 4 for x in (keys, values))
    compressed = sum(x.numel() * x.element_size() for x in layer.compressed_kv())
    assert layer.nbytes() == raw + compressed if not independent else layer.nbytes() < raw + compressed


def test_fused_compression_takes_the_hidden_layer_in_chunks(rng, monkeypatch):
    """Head dim not a power of two, hidden ≠ head dim and weight tiles smaller than the hidden layer (40
    units in chunks of 16): the fused kernel still writes φ of each completed block (17 new tokens)."""
    monkeypatch.setattr(compress_kernels, "TILE", 512)
    params, heads, dim, pads, prefill = PARAMS, 2, 24, [0, 9], 30
    torch.manual_seed(1)
    phi = BlockCompressor(dim, params.compress_block, params.compress_stride, hidden=40)
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(0.0, 0.3)
    keys = torch.randn(2, heads, prefill + 17, dim, generator=rng)
    layer = NSACacheLayer(heads, False, params)
    layer.update(keys[:, :, :prefill], keys[:, :, :prefill])
    width = num_compressed_blocks(prefill, params.compress_block, params.compress_stride)
    stale = torch.randn(2, width, heads, dim, generator=rng)
    layer.start(torch.tensor(pads), stale, stale)
    layer.update(keys[:, :, prefill:], keys[:, :, prefill:])
    layer.extend_compressed(phi, phi, "triton")
    got, _ = layer.compressed_kv()
    for b, pad in enumerate(pads):
        before = num_compressed_blocks(prefill - pad, params.compress_block, params.compress_stride)
        after = num_compressed_blocks(prefill + 17 - pad, params.compress_block, params.compress_stride)
        assert after - before >= 4
        with torch.no_grad():
            want = phi(keys[b : b + 1, :, pad:].transpose(1, 2))[0]
        torch.testing.assert_close(got[b, before:after], want[before:after], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[b, :before], stale[b, :before])


def test_trimmed_timeline_keeps_what_the_next_step_needs(rng):
    """A window timeline (keep = w − 1) appended token by token holds the last ≥ keep tokens, and a bounded
    number of them: O(1) amortised work per token, memory independent of the sequence length."""
    timeline = _Timeline(keep=23)
    tokens = torch.randn(1, 1, 2000, 2, generator=rng)
    timeline.append(tokens[:, :, :5], -tokens[:, :, :5])
    for end in range(6, 2001):
        timeline.append(tokens[:, :, end - 1 : end], -tokens[:, :, end - 1 : end])
        held, negated = timeline.view()
        assert min(end, 24) <= held.shape[2] <= 2 * ROUND and timeline.end == end
        assert torch.equal(held, tokens[:, :, end - held.shape[2] : end]) and torch.equal(negated, -held)


def test_cache_layer_batch_operations(rng):
    layer = NSACacheLayer(1, False, PARAMS)
    keys = torch.randn(2, 1, 30, 4, generator=rng)
    layer.update(keys, keys + 1)
    layer.start(torch.tensor([0, 3]), torch.randn(2, 5, 1, 4), torch.randn(2, 5, 1, 4))
    layer.update(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer.pads == [3, 0] and torch.equal(layer.selection_kv()[0][0, :30, 0], keys[1, 0])
    layer.batch_repeat_interleave(2)
    assert layer.pads == [3, 3, 0, 0] and layer.selection_kv()[0].shape[0] == 4
    layer.batch_select_indices(torch.tensor([0, 2]))
    assert layer.pads == [3, 0] and torch.equal(layer.seq_lens(), torch.tensor([28, 31], dtype=torch.int32))
    layer.crop(-1)
    assert layer.get_seq_length() == 30 and layer.selection_kv()[0].shape[1] == 30
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.is_initialized


def _importance(q, k_cmp, seq_lens, params):
    """Float64 selection importance (B, n, Hkv, blocks) of decode queries, and each row's current block."""
    batch, n, q_heads, _ = q.shape
    kv_heads = k_cmp.shape[2]
    t = seq_lens.long()[:, None] - n + torch.arange(n, device=q.device)
    ci = torch.arange(k_cmp.shape[1], device=q.device)
    visible = ci * params.compress_stride + params.compress_block - 1 <= t[..., None]
    scores = torch.einsum(
        "bnhd,bchd->bnhc", q.double(), k_cmp.double().repeat_interleave(q_heads // kv_heads, 2)
    )
    scores = (scores * params.scale).masked_fill(~visible[:, :, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num()
    p = p.view(batch, n, kv_heads, q_heads // kv_heads, -1).sum(3)
    blocks = -(-int(seq_lens.max()) // params.block_size)
    ratio, per_cmp = (
        params.block_size // params.compress_stride,
        params.compress_block // params.compress_stride,
    )
    importance = torch.zeros(batch, n, kv_heads, blocks, dtype=torch.float64, device=q.device)
    for j in range(blocks):
        for k in range(ratio + per_cmp - 1):
            i = ratio * (j + 1) - 1 - k
            if 0 <= i < p.shape[-1]:
                weight = min(k, ratio - 1, per_cmp - 1, ratio + per_cmp - 2 - k) + 1
                importance[..., j] += weight * p[..., i]
    return importance, t.div(params.block_size, rounding_mode="floor")


def _check_near_optimal(indices, importance, current, tolerance):
    """Every chosen non-forced block is at least as important as any unchosen candidate, up to tolerance."""
    blocks = importance.shape[-1]
    j = torch.arange(blocks, device=indices.device)
    cur = current[:, :, None, None]
    chosen = torch.zeros(*importance.shape[:-1], blocks + 1, dtype=torch.bool, device=indices.device)
    chosen = chosen.scatter_(-1, torch.where(indices >= 0, indices, blocks), True)[..., :blocks]
    forced = (j == 0) | (j == cur) | (j == cur - 1)
    candidate = j <= cur
    assert (chosen | ~(forced & candidate)).all(), "a forced block is missing"
    low = importance.masked_fill(~chosen | forced, float("inf")).amin(-1)
    high = importance.masked_fill(chosen | ~candidate, float("-inf")).amax(-1)
    scale = importance.masked_fill(~candidate, 0).amax(-1)
    assert (low >= high - tolerance * scale).all()


GPU_CASES = [
    # (Hq, Hkv, D, dtype, n): llama-G4 and paper-G16 in bf16; G = 1, 3, 7 in float32 (tf32 products).
    (32, 8, 128, torch.bfloat16, 1),
    (64, 4, 128, torch.bfloat16, 1),
    (64, 4, 128, torch.bfloat16, 3),
    (64, 4, 128, torch.bfloat16, 5),  # n·G > MAX_ROWS: two chunks of new tokens
    (3, 1, 64, torch.float32, 2),
    (7, 1, 64, torch.float32, 1),
    (1, 1, 64, torch.float32, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("q_heads", "kv_heads", "dim", "dtype", "n"), GPU_CASES)
def test_gpu_kernels_match_reference(rng, monkeypatch, q_heads, kv_heads, dim, dtype, n):
    """Default geometry, three sequences of different lengths: the reference for the kernel's own selection,
    and that selection is the top-n of the float64 importance up to rounding."""
    monkeypatch.setattr(buffers, "POISON", True)
    params = SparsityParams().resolved(dim)
    sequences = [sequence(rng, t, q_heads, kv_heads, dim, dtype, params=params) for t in (3001, 2048, 700)]
    inputs = {k: v.cuda() for k, v in batch_cache(rng, sequences, n, params).items()}
    out, lse, indices = kernels.nsa_decode(*decode_args(inputs), params)
    assert torch.isfinite(out).all() and out.dtype == dtype
    # The merge order does not depend on which program finishes first: a rerun is bitwise the same.
    assert all(torch.equal(out, kernels.nsa_decode(*decode_args(inputs), params)[0]) for _ in range(3))
    upcast = [x.float() if x.is_floating_point() else x for x in decode_args(inputs)]
    expected, expected_lse, _ = reference.nsa_decode(*upcast, params, indices=indices)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert ((out.float() - expected).norm() / expected.norm()).item() < tolerance
    finite = expected_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    assert torch.allclose(lse[finite], expected_lse[finite], atol=5e-2 if dtype == torch.bfloat16 else 5e-3)
    importance, current = _importance(inputs["q"], inputs["k_cmp"], inputs["seq_lens"], params)
    _check_near_optimal(indices, importance, current, 2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "n", "late_window", "win_span"),
    [(64, 4, 1, 0, 64), (64, 4, 1, 1, 512), (32, 8, 2, 1, 256), (32, 8, 2, 0, 64)],
)
def test_gpu_long_context_kernels_match_reference(
    rng, monkeypatch, q_heads, kv_heads, n, late_window, win_span
):
    """Contexts long enough for many compressed splits and several ranked parts, bf16, default geometry;
    the window in 64-key programs or longer ones, in the compressed launch or (running beside select) in the
    slot launch."""
    monkeypatch.setattr(buffers, "POISON", True)
    monkeypatch.setattr(kernels, "LATE_WINDOW", late_window)
    monkeypatch.setattr(kernels, "WIN_SPAN", win_span)
    params = SparsityParams().resolved(128)
    lengths = torch.tensor([40000, 17000, 2500])
    width = int(lengths.max())
    tc = num_compressed_blocks(width, params.compress_block, params.compress_stride)

    def randn(*shape):
        return torch.randn(*shape, generator=rng).to("cuda", torch.bfloat16)

    args = [
        randn(3, n, q_heads, 128),
        randn(3, width, kv_heads, 128),
        randn(3, width, kv_heads, 128),
        randn(3, tc, kv_heads, 128),
        randn(3, tc, kv_heads, 128),
        torch.rand(3, n, q_heads, 3, generator=rng).to("cuda", torch.bfloat16),
        lengths.cuda(),
    ]
    out, lse, indices = kernels.nsa_decode(*args, params)
    # Five ranked parts per token, merged by whichever finishes last: reruns select the same blocks.
    assert all(torch.equal(indices, kernels.nsa_decode(*args, params)[2]) for _ in range(10))
    upcast = [x.float() if x.is_floating_point() else x for x in args]
    expected, expected_lse, _ = reference.nsa_decode(*upcast, params, indices=indices)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 2e-2
    torch.testing.assert_close(lse, expected_lse, atol=5e-2, rtol=0)
    importance, current = _importance(args[0], args[3], args[6], params)
    _check_near_optimal(indices, importance, current, 2e-2)


@pytest.mark.gpu
def test_gpu_decode_step_equals_the_training_kernels(rng):
    """The spec's property on the GPU: decode kernels at T vs the training kernels' row T − 1 (float32)."""
    from nsa_convert.kernels import nsa_forward

    params = SparsityParams().resolved(64)
    x = sequence(rng, 2200, 8, 2, 64, torch.float32, params=params)
    x = {k: v.cuda() for k, v in x.items()}
    full_out, _, full_indices = nsa_forward(**x, params=params)
    lengths = [1100, 1600, 2047, 2200]
    sequences = []
    for length in lengths:
        count = num_compressed_blocks(length, params.compress_block, params.compress_stride)
        seq = {name: t[:, :length] for name, t in x.items()}
        seq["k_cmp"], seq["v_cmp"] = x["k_cmp"][:, :count], x["v_cmp"][:, :count]
        sequences.append(seq)
    inputs = batch_cache(rng, [{k: v.cpu() for k, v in s.items()} for s in sequences], 1, params)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    out, _, indices = ops.nsa_decode_with_stats(*decode_args(inputs), backend="triton")
    rows = torch.tensor(lengths, device="cuda") - 1
    same = (indices[:, 0] == full_indices[0, rows]).all(-1)
    assert same.float().mean() >= 0.75
    keep = same.repeat_interleave(4, dim=1)
    got, want = out[:, 0][keep], full_out[0, rows][keep]
    assert ((got - want).norm() / want.norm()).item() < 2e-3


@pytest.mark.gpu
def test_gpu_decode_step_captures_in_a_cuda_graph(rng, monkeypatch):
    """No host sync: one decode step records into a CUDA graph and replays on new inputs (with two ranked
    parts, so that each replay resets the counters of the part programs' merge)."""
    monkeypatch.setattr(kernels, "PART", 16)
    params = SparsityParams().resolved(128)
    sequences = [sequence(rng, t, 32, 8, 128, torch.bfloat16, params=params) for t in (1500, 1200)]
    static = {k: v.cuda() for k, v in batch_cache(rng, sequences, 1, params).items()}
    args = decode_args(static)
    ops.nsa_decode(*args, backend="triton")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.nsa_decode(*args, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.nsa_decode(*args, backend="triton")
    static["q"].copy_(torch.randn_like(static["q"]))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ops.nsa_decode(*args, backend="triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [128, 192])
@pytest.mark.parametrize("step", [1, 40])
def test_gpu_fused_compression_matches_the_module(rng, dim, step):
    """bf16 at the paper's geometry: the fused kernel writes φ (computed in float32 by the module) of each
    block the step completes, for left-padded sequences, without a host sync."""
    params = SparsityParams().resolved(dim)
    heads, pads, prefill = 4, [0, 7, 300, 1001], 4015  # with step 1, sequence 0 alone completes one
    layer = NSACacheLayer(heads, False, params)
    compress_k, _ = compressors(dim, params)
    reference_k = copy.deepcopy(compress_k).cuda()
    compress_k = compress_k.cuda().bfloat16()
    keys = torch.randn(len(pads), heads, prefill + step, dim, generator=rng).cuda().bfloat16()
    layer.update(keys[:, :, :prefill], keys[:, :, :prefill])
    width = num_compressed_blocks(prefill, params.compress_block, params.compress_stride)
    stale = torch.randn(len(pads), width, heads, dim, generator=rng).cuda().bfloat16()
    layer.start(torch.tensor(pads), stale, stale)
    layer.update(keys[:, :, prefill:], keys[:, :, prefill:])
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer.extend_compressed(compress_k, compress_k, "triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got, _ = layer.compressed_kv()
    for b, pad in enumerate(pads):
        own = keys[b : b + 1, :, pad:].transpose(1, 2).float()
        before = num_compressed_blocks(prefill - pad, params.compress_block, params.compress_stride)
        after = num_compressed_blocks(prefill + step - pad, params.compress_block, params.compress_stride)
        with torch.no_grad():
            want = reference_k(own)[0, before:after]
        assert after > before or (step == 1 and b > 0)
        assert torch.equal(got[b, :before], stale[b, :before])
        if after > before:
            new = got[b, before:after].float()
            assert ((new - want).norm() / want.norm()).item() < 1e-2
