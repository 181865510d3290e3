"""Triton NSA kernels on the GPU: bf16 at long context against a float32 reference, chunked over queries.

The reference takes the kernel's own selection (bf16 scores may break near-ties differently) and is checked
for that selection separately: the chosen blocks' float32 importance must match the best available.
Every buffer the kernels write is poisoned first (buffers.POISON), so an unwritten element shows as NaN.
"""

from __future__ import annotations

import pytest
import torch

from nsa_convert.kernels import buffers, nsa_backward, nsa_forward
from nsa_convert.spec import SparsityParams, num_compressed_blocks

pytestmark = pytest.mark.gpu


def _gather(x, tok):
    """x [B, T, Hkv, D], tok [B, C, Hkv, S] (clamped ≥ 0) → [B, C, Hkv, S, D]."""
    b, c, h, s = tok.shape
    xh = x.permute(0, 2, 1, 3)  # [B, Hkv, T, D]
    idx = tok.permute(0, 2, 1, 3).reshape(b, h, c * s, 1).expand(-1, -1, -1, x.shape[-1])
    return torch.gather(xh, 2, idx).view(b, h, c, s, -1).permute(0, 2, 1, 3, 4)


def _attend(q, keys, values, mask, scale):
    """q [B, C, Hkv, G, D], keys/values [B, C, Hkv, S, D], mask [B, C, Hkv, S] → [B, C, Hkv, G, Dv]."""
    s = torch.einsum("bchgd,bchsd->bchgs", q, keys) * scale
    s = s.masked_fill(~mask[:, :, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.where(mask[:, :, :, None, :], torch.exp(s - torch.where(lse.isinf(), 0.0, lse)), 0.0)
    return torch.einsum("bchgs,bchsd->bchgd", p, values)


def reference_chunk(x, params, indices, c0, c1):
    """Float32 NSA output of queries c0 … c1 − 1 for the given selection: [B, C, Hq, Dv]."""
    q, k, v, kc, vc, gates = (x[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "gates"))
    b, _, hq, dk = q.shape
    hkv = k.shape[2]
    qc = q[:, c0:c1].reshape(b, c1 - c0, hkv, hq // hkv, dk)
    t = torch.arange(c0, c1, device=q.device)
    tc = kc.shape[1]
    span, d, sel, w = params.compress_block, params.compress_stride, params.block_size, params.window
    ci = torch.arange(tc, device=q.device)
    mask_c = (ci[None, :] * d + span - 1 <= t[:, None])[None, :, None, :].expand(b, -1, hkv, -1)
    keys_c = kc[:, None].expand(-1, c1 - c0, -1, -1, -1).transpose(2, 3)
    vals_c = vc[:, None].expand(-1, c1 - c0, -1, -1, -1).transpose(2, 3)
    o_c = _attend(qc, keys_c, vals_c, mask_c, params.scale)
    idx = indices[:, c0:c1]
    tok = (idx[..., None] * sel + torch.arange(sel, device=q.device)).flatten(-2)
    mask_s = (idx[..., None] >= 0).expand(-1, -1, -1, -1, sel).flatten(-2) & (tok <= t[None, :, None, None])
    tok = tok.clamp(0, q.shape[1] - 1)
    o_s = _attend(qc, _gather(k, tok), _gather(v, tok), mask_s, params.scale)
    tok_w = t[:, None] - w + 1 + torch.arange(w, device=q.device)[None, :]
    mask_w = (tok_w >= 0)[None, :, None, :].expand(b, -1, hkv, -1)
    tok_w = tok_w.clamp_min(0)[None, :, None, :].expand(b, -1, hkv, -1)
    kw, vw = x.get("k_win", k), x.get("v_win", v)
    o_w = _attend(qc, _gather(kw, tok_w), _gather(vw, tok_w), mask_w, params.scale)
    g = gates[:, c0:c1].reshape(b, c1 - c0, hkv, hq // hkv, 3)
    out = g[..., 0:1] * o_c + g[..., 1:2] * o_s + g[..., 2:3] * o_w
    return out.reshape(b, c1 - c0, hq, -1)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _inputs(b, t, hq, hkv, dk, dv, params, dtype, separate=False):
    tc = num_compressed_blocks(t, params.compress_block, params.compress_stride)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    x = dict(
        q=r(b, t, hq, dk),
        k=r(b, t, hkv, dk),
        v=r(b, t, hkv, dv),
        k_cmp=r(b, tc, hkv, dk),
        v_cmp=r(b, tc, hkv, dv),
        gates=torch.rand(b, t, hq, 3, device="cuda", dtype=dtype),
    )
    if separate:
        x["k_win"] = r(b, t, hkv, dk)
        x["v_win"] = r(b, t, hkv, dv)
    return x


PAPER = SparsityParams()


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(buffers, "POISON", True)


@pytest.mark.parametrize(
    "t,hq,hkv,dk,dv,chunk",
    [(32768, 16, 1, 128, 128, 64), (8191, 28, 4, 128, 128, 256), (5000, 12, 4, 64, 64, 512)],
)
def test_forward_bf16_long(t, hq, hkv, dk, dv, chunk):
    p = PAPER.resolved(dk)
    x = _inputs(1, t, hq, hkv, dk, dv, p, torch.bfloat16)
    out, lse, idx = nsa_forward(**x, params=p)
    assert not out.isnan().any() and not lse.isnan().any() and not (idx == -7777).any()
    x32 = {n: v.float() for n, v in x.items()}
    starts = [0, t // 2, t - chunk]
    for c0 in starts:
        ref = reference_chunk(x32, p, idx, c0, c0 + chunk)
        assert _rel(out[:, c0 : c0 + chunk], ref) < 1e-2


@pytest.mark.parametrize(
    "t,hq,hkv,dk,dv,separate,overrides",
    [
        (4096, 16, 2, 128, 128, False, {}),
        (3000, 7, 1, 192, 128, True, {}),
        (2500, 32, 8, 64, 64, False, {}),
        # The selected passes' key tiles (benchmark overrides, read at launch).
        (4096, 16, 2, 128, 128, False, {"NSA_SLC_DQ": "2,16", "NSA_SLC_DKDV": "32,4,2,1024,16"}),
        (3000, 8, 2, 128, 128, False, {"NSA_SLC_DQ": "4,32", "NSA_SLC_DKDV": "64,8,2,1024,32"}),
        # The banded passes' tiles (the sweep's candidates that do not spill).
        (4096, 16, 2, 128, 128, True, {"NSA_BANDED_DKDV": "64,64,8,2", "NSA_BANDED_DQ": "64,32,4,2"}),
        (3000, 7, 1, 128, 128, False, {"NSA_BANDED_DKDV": "32,32,4,2"}),
    ],
)
def test_backward_bf16(t, hq, hkv, dk, dv, separate, overrides, monkeypatch):
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    p = PAPER.resolved(dk)
    x = _inputs(1, t, hq, hkv, dk, dv, p, torch.bfloat16, separate)
    out, lse, idx = nsa_forward(**x, params=p)
    do = torch.randn_like(out)
    got = nsa_backward(
        do, x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["gates"], x.get("k_win"), x.get("v_win"),
        out, lse, idx, p,
    )  # fmt: skip
    leaves = {n: v.float().requires_grad_() for n, v in x.items()}
    chunk = 512
    for c0 in range(0, t, chunk):
        c1 = min(t, c0 + chunk)
        ref = reference_chunk(leaves, p, idx, c0, c1)
        (ref * do[:, c0:c1].float()).sum().backward()
    names = ["q", "k", "v", "k_cmp", "v_cmp", "gates", "k_win", "v_win"]
    for name, g in zip(names, got, strict=True):
        if name not in x:
            assert g is None
            continue
        assert not g.isnan().any(), name
        assert _rel(g, leaves[name].grad) < 1e-2, name


def test_selection_bf16_is_near_optimal():
    """Selection on bf16 inputs: float32 importance of the chosen set ≈ that of the float32 top-n."""
    p = PAPER.resolved(128)
    t = 8192
    x = _inputs(1, t, 32, 4, 128, 128, p, torch.bfloat16)
    _, _, idx = nsa_forward(**x, params=p)
    rows = torch.arange(t - 256, t, device="cuda")
    q = x["q"][0, rows].float().view(256, 4, 8, 128)
    kc = x["k_cmp"][0].float()
    s = torch.einsum("thgd,chd->thgc", q, kc) * p.scale
    vis = torch.arange(kc.shape[0], device="cuda") * p.compress_stride + p.compress_block - 1 <= rows[:, None]
    s = s.masked_fill(~vis[:, None, None, :], float("-inf"))
    pc = torch.softmax(s, -1)
    nb = t // p.block_size
    r, qc = p.block_size // p.compress_stride, p.compress_block // p.compress_stride
    imp = torch.zeros(256, 4, nb, device="cuda")
    for m in range(r):
        for n in range(qc):
            i = r * torch.arange(1, nb + 1, device="cuda") - 1 - m - n
            ok = (i >= 0) & (i < kc.shape[0])
            imp[..., ok] += pc.sum(2)[..., i[ok]]
    cur = rows[:, None, None] // p.block_size
    j = torch.arange(nb, device="cuda")
    free = (j <= cur) & (j != 0) & (j != cur) & (j != cur - 1)
    best = imp.masked_fill(~free, -1).topk(p.top_n - 3, -1).values.sum(-1)
    sel = idx[0, rows]
    picked = torch.gather(imp, 2, sel.clamp_min(0)) * (sel >= 0)
    sel_free = torch.gather(free.expand_as(imp), 2, sel.clamp_min(0)) & (sel >= 0)
    got = (picked * sel_free).sum(-1)
    assert ((best - got) <= 1e-3 * best.abs() + 1e-4).float().mean() > 0.99
