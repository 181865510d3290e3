"""An independent float64 NSA written straight from NSA_SPEC.md with plain per-(b, t, hq) loops.

It shares no code with `nsa_convert.reference` (only the geometry helpers of `nsa_convert.spec`), so
the two implementations check each other.  Slow by design: keep T to a few hundred.
"""

from __future__ import annotations

import torch

from nsa_convert.spec import SparsityParams, num_compressed_blocks, num_visible_compressed, window_start


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Attn(q, K, V) = softmax(scale · K q) V; the zero vector over an empty K."""
    if keys.shape[0] == 0:
        return torch.zeros(values.shape[-1], dtype=torch.float64)
    weights = torch.softmax(scale * (keys @ query), dim=0)
    return weights @ values


def _compressed_probs(
    query: torch.Tensor, k_cmp: torch.Tensor, t: int, params: SparsityParams
) -> list[float]:
    """p_cmp[t] for one query head: softmax weights over the compressed blocks query t sees."""
    visible = num_visible_compressed(t, params.compress_block, params.compress_stride)
    if visible == 0:
        return []
    scores = [params.scale * float(k_cmp[i] @ query) for i in range(visible)]
    return torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist()


def naive_importance(q: torch.Tensor, k_cmp: torch.Tensor, t: int, params: SparsityParams) -> list[float]:
    """Eq. 9 importance of blocks 0 … ⌊t/l'⌋ for query t of one KV group, float64 loops.

    q: (G, Dk), the group's query heads at t; k_cmp: (Tc, Dk), the group's compressed keys.
    """
    current = t // params.block_size
    slices_per_block = params.block_size // params.compress_stride
    slices_per_cmp = params.compress_block // params.compress_stride
    importance = [0.0] * (current + 1)
    for head in q.double():
        p_cmp = _compressed_probs(head, k_cmp.double(), t, params)
        for j in range(current + 1):
            for m in range(slices_per_block):
                for n in range(slices_per_cmp):
                    i = slices_per_block * (j + 1) - 1 - m - n
                    if 0 <= i < len(p_cmp):
                        importance[j] += p_cmp[i]
    return importance


def naive_select(q: torch.Tensor, k_cmp: torch.Tensor, params: SparsityParams) -> torch.Tensor:
    """Selected blocks per (b, t, kv head), sorted ascending and padded with -1 to top_n.

    q: (B, T, Hq, Dk); k_cmp: (B, Tc, Hkv, Dk); params.scale must be resolved.
    Returns a LongTensor (B, T, Hkv, top_n).
    """
    batch, seq_len, num_q_heads, _ = q.shape
    num_kv_heads = k_cmp.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.full((batch, seq_len, num_kv_heads, params.top_n), -1, dtype=torch.long)
    for b in range(batch):
        for t in range(seq_len):
            current = t // params.block_size
            for h in range(num_kv_heads):
                importance = naive_importance(q[b, t, h * group : (h + 1) * group], k_cmp[b, :, h], t, params)
                chosen = {j for j in (0, current - 1, current) if 0 <= j <= current}
                rest = sorted(
                    (j for j in range(current + 1) if j not in chosen), key=lambda j: (-importance[j], j)
                )
                chosen.update(rest[: params.top_n - len(chosen)])
                picked = sorted(chosen)
                out[b, t, h, : len(picked)] = torch.tensor(picked, dtype=torch.long)
    return out


def naive_nsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gates: torch.Tensor,
    params: SparsityParams,
    k_win: torch.Tensor | None = None,
    v_win: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA output (B, T, Hq, Dv) in float64 and the selected blocks (B, T, Hkv, top_n).

    q (B, T, Hq, Dk), k (B, T, Hkv, Dk), v (B, T, Hkv, Dv), k_cmp (B, Tc, Hkv, Dk), v_cmp (B, Tc, Hkv, Dv),
    gates (B, T, Hq, 3) ordered (cmp, slc, win); k_win/v_win, when given, replace k/v in the window branch.
    """
    q, k, v, k_cmp, v_cmp, gates = (x.double() for x in (q, k, v, k_cmp, v_cmp, gates))
    k_win = k if k_win is None else k_win.double()
    v_win = v if v_win is None else v_win.double()
    indices = naive_select(q, k_cmp, params)
    batch, seq_len, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[2]
    scale = params.scale
    out = torch.zeros(batch, seq_len, num_q_heads, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for t in range(seq_len):
            visible = num_visible_compressed(t, params.compress_block, params.compress_stride)
            window = torch.arange(window_start(t, params.window), t + 1)
            for hq in range(num_q_heads):
                h = hq // group
                query = q[b, t, hq]
                o_cmp = _attend(query, k_cmp[b, :visible, h], v_cmp[b, :visible, h], scale)
                tokens = [
                    s
                    for j in indices[b, t, h].tolist()
                    if j >= 0
                    for s in range(j * params.block_size, (j + 1) * params.block_size)
                    if s <= t
                ]
                selected = torch.tensor(tokens, dtype=torch.long)
                o_slc = _attend(query, k[b, selected, h], v[b, selected, h], scale)
                o_win = _attend(query, k_win[b, window, h], v_win[b, window, h], scale)
                g_cmp, g_slc, g_win = gates[b, t, hq].tolist()
                out[b, t, hq] = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win
    return out, indices


def random_inputs(
    rng: torch.Generator,
    params: SparsityParams,
    *,
    batch: int = 1,
    seq_len: int = 37,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    value_dim: int = 6,
    windows: bool = False,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Fresh random NSA inputs (never zeros) keyed like nsa_forward's arguments; gates lie in (0, 1)."""
    num_cmp = num_compressed_blocks(seq_len, params.compress_block, params.compress_stride)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=rng, dtype=torch.float64).to(dtype)

    inputs = {
        "q": randn(batch, seq_len, q_heads, head_dim),
        "k": randn(batch, seq_len, kv_heads, head_dim),
        "v": randn(batch, seq_len, kv_heads, value_dim),
        "k_cmp": randn(batch, num_cmp, kv_heads, head_dim),
        "v_cmp": randn(batch, num_cmp, kv_heads, value_dim),
        "gates": torch.rand(batch, seq_len, q_heads, 3, generator=rng, dtype=torch.float64).to(dtype),
    }
    if windows:
        inputs["k_win"] = randn(batch, seq_len, kv_heads, head_dim)
        inputs["v_win"] = randn(batch, seq_len, kv_heads, value_dim)
    return inputs
