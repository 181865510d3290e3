"""Triton NSA kernels under the interpreter (CPU, float32, small shapes) against a float64 reference.

The reference here is dense and vectorised (masks over all keys), so it can take the kernel's own block
selection: outputs are compared for the same selection, and the selection is checked on its own (equal to
the reference's wherever the importance is not a near-tie).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nsa_convert.kernels import (
    buffers,
    nsa_backward,
    nsa_backward_varlen,
    nsa_forward,
    nsa_forward_varlen,
    select_blocks,
    selected,
    selection,
)
from nsa_convert.spec import SparsityParams, num_compressed_blocks


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    """Every buffer a kernel must write starts as NaN (−7777 for indices), so an unwritten element shows."""
    monkeypatch.setattr(buffers, "POISON", True)


def _importance(q, k_cmp, params):
    """p_slc summed over each group: [B, Hkv, T, NB] (float64), and the compressed lse [B, Hq, T]."""
    b, t, hq, _ = q.shape
    hkv, tc = k_cmp.shape[2], k_cmp.shape[1]
    g = hq // hkv
    span, d, sel = params.compress_block, params.compress_stride, params.block_size
    pos = torch.arange(t)
    kc = k_cmp.double().repeat_interleave(g, 2)
    s = torch.einsum("bthd,bshd->bhts", q.double(), kc) * params.scale
    vis = (torch.arange(tc)[None, :] * d + span - 1) <= pos[:, None]
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(vis, torch.exp(s - lse[..., None]), 0.0)
    nb = -(-t // sel)
    r, qc = sel // d, span // d
    imp = torch.zeros(b, hq, t, nb, dtype=torch.float64)
    for j in range(nb):
        for m in range(r):
            for n in range(qc):
                i = r * (j + 1) - 1 - m - n
                if 0 <= i < tc:
                    imp[..., j] += p[..., i]
    return imp.view(b, hkv, g, t, nb).sum(2), lse


def _select(imp, params):
    """Top-n with forced initial/previous/current blocks, ties to the lower index: [B, T, Hkv, n]."""
    t, nb = imp.shape[-2:]
    cur = torch.arange(t)[:, None] // params.block_size
    j = torch.arange(nb)[None, :]
    score = imp.clone()
    score = torch.where((j == 0) | (j == cur) | (j == cur - 1), float("inf"), score)
    score = torch.where(j <= cur, score, float("-inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True)
    top = order.indices[..., : params.top_n]
    ok = order.values[..., : params.top_n] > float("-inf")
    top = torch.where(ok, top, nb + 1).sort(-1).values
    top = torch.where(top == nb + 1, -1, top)
    if top.shape[-1] < params.top_n:
        pad = torch.full((*top.shape[:-1], params.top_n - top.shape[-1]), -1, dtype=top.dtype)
        top = torch.cat([top, pad], -1)
    return top.permute(0, 2, 1, 3)


def _attend(q, k, v, mask, scale):
    """Softmax attention over the keys `mask` allows ([B, Hq, T, S]); zero output and −inf lse if none."""
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(mask, torch.exp(s - torch.where(lse.isinf(), 0.0, lse)[..., None]), 0.0)
    return torch.einsum("bhts,bshd->bthd", p, v), lse


def reference(q, k, v, k_cmp, v_cmp, gates, params, indices, k_win=None, v_win=None):
    """Float64 NSA with a given selection: (out [B, T, Hq, Dv], lse [B, T, Hq, 3])."""
    b, t, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    span, d, sel = params.compress_block, params.compress_stride, params.block_size
    pos = torch.arange(t)
    rep = lambda x: x.repeat_interleave(g, 2)  # noqa: E731
    tc = k_cmp.shape[1]
    vis_c = ((torch.arange(tc)[None, :] * d + span - 1) <= pos[:, None]).expand(b, hq, t, tc)
    o_c, lse_c = _attend(q, rep(k_cmp), rep(v_cmp), vis_c, params.scale)
    blk = torch.arange(t) // sel
    chosen = (indices[..., None] == blk).any(-2)  # [B, T, Hkv, S]
    causal = pos[None, :] <= pos[:, None]
    mask_s = rep(chosen).permute(0, 2, 1, 3) & causal
    o_s, lse_s = _attend(q, rep(k), rep(v), mask_s, params.scale)
    kw = k if k_win is None else k_win
    vw = v if v_win is None else v_win
    mask_w = (causal & (pos[None, :] > pos[:, None] - params.window)).expand(b, hq, t, t)
    o_w, lse_w = _attend(q, rep(kw), rep(vw), mask_w, params.scale)
    out = gates[..., 0:1] * o_c + gates[..., 1:2] * o_s + gates[..., 2:3] * o_w
    lse = torch.stack([lse_c, lse_s, lse_w], -1).permute(0, 2, 1, 3)
    return out, lse


def _inputs(b, t, hq, hkv, dk, dv, params, gen, separate_win=False):
    tc = num_compressed_blocks(t, params.compress_block, params.compress_stride)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = dict(
        q=r(b, t, hq, dk),
        k=r(b, t, hkv, dk),
        v=r(b, t, hkv, dv),
        k_cmp=r(b, tc, hkv, dk),
        v_cmp=r(b, tc, hkv, dv),
        gates=torch.rand(b, t, hq, 3, generator=gen),
    )
    if separate_win:
        x["k_win"] = r(b, t, hkv, dk)
        x["v_win"] = r(b, t, hkv, dv)
    return x


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check_selection(idx, q, k_cmp, params):
    """Kernel selection equals the reference's except at near-ties of the importance."""
    imp, _ = _importance(q, k_cmp, params)
    ref = _select(imp, params)
    assert idx.shape == ref.shape
    diff = (idx != ref).any(-1)
    if diff.any():
        b_, t_, h_ = diff.nonzero(as_tuple=True)
        for bi, ti, hi in zip(b_.tolist(), t_.tolist(), h_.tolist(), strict=True):
            row = imp[bi, hi, ti]
            got = set(idx[bi, ti, hi].tolist()) - {-1}
            want = set(ref[bi, ti, hi].tolist()) - {-1}
            assert len(got) == len(want)
            a = sorted(row[list(got - want)].tolist())
            w = sorted(row[list(want - got)].tolist())
            assert max(abs(x - y) for x, y in zip(a, w, strict=True)) <= 1e-5 * max(1.0, row.max().item())
        assert diff.float().mean() < 0.02


SMALL = SparsityParams(block_size=16, top_n=3, window=24, compress_block=32, compress_stride=16)
DEFAULTISH = SparsityParams(block_size=32, top_n=4, window=40, compress_block=32, compress_stride=16)
WIDE = SparsityParams(block_size=32, top_n=5, window=48, compress_block=16, compress_stride=16)


@pytest.mark.parametrize(
    "hq,hkv,t,params",
    [
        (1, 1, 77, DEFAULTISH),
        (3, 1, 130, DEFAULTISH),
        (8, 2, 101, SMALL),
        (7, 1, 93, WIDE),
        (16, 1, 70, DEFAULTISH),
    ],
)
def test_forward_matches_reference(hq, hkv, t, params, rng):
    x = _inputs(2 if hq == 1 else 1, t, hq, hkv, 16, 16, params, rng)
    p = params.resolved(16)
    out, lse, idx = nsa_forward(**x, params=p)
    _check_selection(idx, x["q"], x["k_cmp"], p)
    ref_out, ref_lse = reference(**{n: v.double() for n, v in x.items()}, params=p, indices=idx)
    assert out.dtype == x["q"].dtype and out.shape == ref_out.shape
    assert _rel(out, ref_out) < 1e-5
    fin = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), fin)
    assert torch.allclose(lse[fin].double(), ref_lse[fin], atol=1e-5)


@pytest.mark.parametrize("path", ["blocks", "positions"])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 1), (16, 1)])
def test_both_selected_forwards_match_reference(path, hq, hkv, rng, monkeypatch):
    """Block by block (partial outputs in chunks of 7 positions that straddle the two sequences) and
    position by position, whatever the group size."""
    monkeypatch.setattr(selected, "BLOCKS_BELOW_GROUP", 10**6 if path == "blocks" else 0)
    p = SMALL.resolved(16)
    monkeypatch.setattr(selected, "PARTIAL_BYTES", 7 * hq * p.top_n * (16 * 4 + 4))
    x = _inputs(2, 61, hq, hkv, 16, 16, p, rng)
    out, lse, idx = nsa_forward(**x, params=p)
    ref_out, ref_lse = reference(**{n: v.double() for n, v in x.items()}, params=p, indices=idx)
    assert _rel(out, ref_out) < 1e-5
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_block_by_block_forward_on_many_packed_documents(rng, monkeypatch):
    """Chunks of 7 positions over documents of every size (each chunk's work list covers only the documents
    it overlaps) give what the position-by-position forward gives."""
    p = SMALL.resolved(16)
    lengths = [50, 3, 1, 7, 0, 33, 2]
    hq, hkv = 4, 2
    seqs = [_inputs(1, n, hq, hkv, 16, 16, p, rng) for n in lengths]
    packed = {name: torch.cat([s[name][0] for s in seqs]) for name in seqs[0]}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    results = {}
    for path in ("blocks", "positions"):
        monkeypatch.setattr(selected, "BLOCKS_BELOW_GROUP", 10**6 if path == "blocks" else 0)
        monkeypatch.setattr(selected, "PARTIAL_BYTES", 7 * hq * p.top_n * (16 * 4 + 4))
        results[path] = nsa_forward_varlen(**packed, params=p, cu_seqlens=cu)
    (out_b, lse_b, idx_b), (out_p, lse_p, idx_p) = results["blocks"], results["positions"]
    assert torch.equal(idx_b, idx_p)
    assert _rel(out_b, out_p) < 1e-5
    assert torch.allclose(lse_b, lse_p, atol=1e-5)


def test_select_blocks_matches_forward_selection(rng):
    x = _inputs(1, 90, 4, 1, 16, 16, DEFAULTISH, rng)
    p = DEFAULTISH.resolved(16)
    idx = select_blocks(x["q"], x["k_cmp"], p)
    _, _, idx_fwd = nsa_forward(**x, params=p)
    assert torch.equal(idx, idx_fwd)
    assert idx.dtype == torch.int64 and idx.shape == (1, 90, 1, p.top_n)


def test_selection_in_position_chunks_matches_reference(rng, monkeypatch):
    """A score buffer of a few positions forces many chunks (long sequences take this path), two sequences."""
    monkeypatch.setattr(selection, "SCORES_BYTES", 4 * 2 * 16 * 16)
    x = _inputs(2, 150, 6, 2, 16, 16, SMALL, rng)
    p = SMALL.resolved(16)
    idx = select_blocks(x["q"], x["k_cmp"], p)
    _check_selection(idx, x["q"], x["k_cmp"], p)


def test_top_n_over_causal_ranges_matches_reference(rng, monkeypatch):
    """Positions past 16 blocks take the top-n pass's wider ranges (16 → 32 blocks at position 256 here), in
    chunks of 48 positions, one of which straddles the range boundary; two sequences."""
    monkeypatch.setattr(selection, "SCORES_BYTES", 4 * 2 * 2 * 32 * 48)
    calls = []
    ranges = selection._causal_ranges
    monkeypatch.setattr(selection, "_causal_ranges", lambda *a: calls.append(ranges(*a)) or calls[-1])
    p = SMALL.resolved(16)
    x = _inputs(2, 300, 4, 2, 16, 16, p, rng)
    idx = select_blocks(x["q"], x["k_cmp"], p)
    _check_selection(idx, x["q"], x["k_cmp"], p)
    assert len(calls) == 7 and [(240, 256, 16), (256, 288, 32)] in calls


def test_causal_ranges_cover_the_chunk_with_enough_blocks():
    for c0, c1, nbp in [(0, 65536, 4096), (1000, 1300, 128), (256, 512, 32), (5, 6, 64), (0, 100, 16)]:
        assert nbp * 16 >= c1
        ranges = selection._causal_ranges(c0, c1, 16, nbp)
        assert ranges[0][0] == c0 and ranges[-1][1] == c1
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        for first, end, blocks in ranges:
            assert first < end and blocks <= nbp and blocks & (blocks - 1) == 0
            assert blocks * 16 >= end


def _grads(x, p, idx, do):
    leaves = {n: v.double().requires_grad_() for n, v in x.items()}
    out, _ = reference(**leaves, params=p, indices=idx)
    out.backward(do.double())
    return {n: v.grad for n, v in leaves.items()}


@pytest.mark.parametrize(
    "hq,hkv,t,params,separate",
    [
        (4, 1, 75, DEFAULTISH, False),
        (3, 1, 83, SMALL, True),
        (8, 1, 66, WIDE, False),
        (16, 2, 50, DEFAULTISH, False),
    ],
)
def test_backward_matches_reference(hq, hkv, t, params, separate, rng):
    _check_backward(hq, hkv, t, params, separate, rng)


@pytest.mark.parametrize("hq,hkv", [(4, 1), (7, 1)])
@pytest.mark.parametrize(
    "override",
    [
        ("NSA_SLC_DQ", "4,16"),  # the selected dq pass takes each 32-key block as two 16-key tiles
        ("NSA_SLC_DKDV", "16,4,1,8,16"),  # the dk/dv pass splits each block's keys over two programs
    ],
    ids=["dq-key-tiles", "dkdv-key-split"],
)
def test_backward_with_selected_blocks_in_key_tiles_matches_reference(hq, hkv, override, rng, monkeypatch):
    monkeypatch.setenv(*override)
    _check_backward(hq, hkv, 75, DEFAULTISH, False, rng)


@pytest.mark.parametrize(
    "override", [("NSA_SLC_DQ", "2,64"), ("NSA_SLC_DQ", "2,24"), ("NSA_SLC_DKDV", "16,4,1,8,8")]
)
def test_key_tile_overrides_that_do_not_divide_the_block_are_refused(override, rng, monkeypatch):
    monkeypatch.setenv(*override)
    with pytest.raises(ValueError, match=f"{override[0]}: keys per tile"):
        _check_backward(4, 1, 40, DEFAULTISH, False, rng)


@pytest.mark.parametrize("hq,hkv", [(4, 1), (7, 1)])
def test_backward_with_other_banded_tiles_matches_reference(hq, hkv, rng, monkeypatch):
    """The banded passes' tile overrides: dq rows and dk/dv keys in other sizes than the forward's."""
    monkeypatch.setenv("NSA_BANDED_DQ", "32,16,4,1")
    monkeypatch.setenv("NSA_BANDED_DKDV", "32,16,4,1")
    _check_backward(hq, hkv, 75, DEFAULTISH, True, rng)


@pytest.mark.parametrize("variable", ["NSA_BANDED_DQ", "NSA_BANDED_DKDV"])
@pytest.mark.parametrize("value", ["64,64,4", "24,64,4,2", "64,64,0,2", "64,64,3,2", "64,x,4,2"])
def test_malformed_banded_overrides_are_refused(variable, value, rng, monkeypatch):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        _check_backward(4, 1, 40, DEFAULTISH, False, rng)


def _check_backward(hq, hkv, t, params, separate, rng):
    x = _inputs(1, t, hq, hkv, 16, 32, params, rng, separate_win=separate)
    p = params.resolved(16)
    out, lse, idx = nsa_forward(**x, params=p)
    do = torch.randn(out.shape, generator=rng)
    got = nsa_backward(
        do, x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["gates"], x.get("k_win"), x.get("v_win"),
        out, lse, idx, p,
    )  # fmt: skip
    want = _grads(x, p, idx, do)
    names = ["q", "k", "v", "k_cmp", "v_cmp", "gates", "k_win", "v_win"]
    for name, g in zip(names, got, strict=True):
        if name not in x:
            assert g is None
            continue
        assert g.shape == x[name].shape and g.dtype == x[name].dtype, name
        assert _rel(g, want[name]) < 1e-4, name


def test_varlen_matches_per_sequence(rng):
    p = DEFAULTISH.resolved(16)
    lengths = [45, 70, 1]
    hq, hkv = 4, 2
    seqs = [_inputs(1, n, hq, hkv, 16, 16, p, rng) for n in lengths]
    cat = {n: torch.cat([s[n][0] for s in seqs]) for n in seqs[0]}
    cu = torch.tensor([0, 45, 115, 116], dtype=torch.int32)
    out, lse, idx = nsa_forward_varlen(**cat, params=p, cu_seqlens=cu)
    do = torch.randn(out.shape, generator=rng)
    grads = nsa_backward_varlen(
        do, cat["q"], cat["k"], cat["v"], cat["k_cmp"], cat["v_cmp"], cat["gates"], None, None,
        out, lse, idx, p, cu,
    )  # fmt: skip
    tc0 = 0
    for i, s in enumerate(seqs):
        a, z = cu[i].item(), cu[i + 1].item()
        tc = s["k_cmp"].shape[1]
        o1, l1, i1 = nsa_forward(**s, params=p)
        assert torch.equal(idx[a:z], i1[0])
        assert _rel(out[a:z], o1[0]) < 1e-6 if z - a > 1 else torch.allclose(out[a:z], o1[0])
        g1 = nsa_backward(
            do[None, a:z], s["q"], s["k"], s["v"], s["k_cmp"], s["v_cmp"], s["gates"], None, None,
            o1, l1, i1, p,
        )  # fmt: skip
        for g, ref, rows in zip(
            grads[:6], g1[:6], [(a, z)] * 3 + [(tc0, tc0 + tc)] * 2 + [(a, z)], strict=True
        ):
            assert torch.allclose(g[rows[0] : rows[1]], ref[0], atol=1e-6)
        tc0 += tc
