"""Selection distillation: a training signal for NSA's top-n block selection, which has no gradient.

A converted model selects blocks by compressed attention scores (the spec's eq. 9 importance), and the
compression MLP starts as the block mean: a block holding one strongly matching token (a passkey, a
definition) scores little above its neighbours, so at long context the selection is close to chance
for such blocks, and the language-modelling loss barely corrects it.  The dense model already knows
which blocks matter: for a query, the attention mass full attention puts on each selection block.

During training, each NSA layer samples some query positions, computes for them (a) the block masses of
full causal attention over the selection branch's keys (the target, no gradient) and (b) the eq. 9
importance from the compressed keys, both summed over the query group and restricted to the blocks the
selection ranks (not the forced initial, previous and current blocks, nor future ones), and scores their
KL divergence.  Its gradient reaches only the key compressor φ_K: queries and raw keys are detached, so
the model's own projections learn nothing from it.

Uniformly sampled queries of ordinary text spread their distant attention thinly; the queries that
retrieve (a passkey's answer, a call of a function defined far back) put much of theirs on one block.
With a pool of p > 1, each layer draws p times as many positions and keeps the most retrieval-like:
those whose full attention picks one block before the window most sharply (`retrieval_focus`).

This module computes the term for one layer (NSAttention calls it); nsa_convert.nn.training turns it on
for a model and collects it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from nsa_convert.nn.compression import BlockCompressor
from nsa_convert.reference import MAX_CHUNK_SCORES, block_importance
from nsa_convert.spec import SparsityParams, num_selection_blocks


def first_ranked_position(params: SparsityParams) -> int:
    """The first query position whose selection ranks more candidate blocks than it keeps (t ≥ n·l')."""
    return max(params.top_n * params.block_size, params.compress_block - 1)


def _group_probs(
    q: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, params: SparsityParams
) -> torch.Tensor:
    """Softmax over the keys each query sees: q (P, Hq, Dk), keys (K, Hkv, Dk), hidden (P, K) true where a
    key is not visible → (P, Hkv, G, K) float32."""
    grouped = q.float().unflatten(1, (keys.shape[1], -1))
    scores = torch.einsum("phgd,khd->phgk", grouped, keys.float()) * params.scale
    return scores.masked_fill(hidden[:, None, None], float("-inf")).softmax(dim=-1)


def block_attention_mass(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, params: SparsityParams
) -> torch.Tensor:
    """Full causal attention's mass on each selection block, averaged over each KV head's query group.

    q (P, Hq, Dk): the queries at `positions` (P,) of one sequence; k (T, Hkv, Dk) its keys.
    Returns (P, Hkv, num_selection_blocks(T)) float32, each row summing to 1.
    """
    seq_len, block = k.shape[0], params.block_size
    future = torch.arange(seq_len, device=k.device) > positions[:, None]
    probs = _group_probs(q, k, future, params)
    padded = F.pad(probs, (0, num_selection_blocks(seq_len, block) * block - seq_len))
    return padded.unflatten(-1, (-1, block)).sum(dim=-1).mean(dim=2)


def compressed_importance(
    q: torch.Tensor, k_cmp: torch.Tensor, positions: torch.Tensor, num_blocks: int, params: SparsityParams
) -> torch.Tensor:
    """The spec's eq. 9 importance of each selection block: (P, Hkv, num_blocks) float32.

    q (P, Hq, Dk) at `positions` (P,); k_cmp (Tc, Hkv, Dk) the sequence's compressed keys.  The same
    numbers `select_blocks` ranks, computed with a gradient with respect to k_cmp.
    """
    starts = torch.arange(k_cmp.shape[0], device=k_cmp.device) * params.compress_stride
    hidden = starts + params.compress_block - 1 > positions[:, None]
    return block_importance(_group_probs(q, k_cmp, hidden, params).sum(dim=2), num_blocks, params)


def ranked_blocks(positions: torch.Tensor, num_blocks: int, params: SparsityParams) -> torch.Tensor:
    """The blocks each position's selection ranks, 1 … ⌊t/l'⌋ − 2 (not block 0, the previous or the
    current one): (P, num_blocks) bool."""
    current = positions.div(params.block_size, rounding_mode="floor")
    index = torch.arange(num_blocks, device=positions.device)
    return (index >= 1) & (index <= current[:, None] - 2)


def _chunk(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query positions per chunk that keep a chunk's scores under MAX_CHUNK_SCORES."""
    return max(1, MAX_CHUNK_SCORES // (q.shape[1] * k.shape[0]))


@torch.no_grad()
def retrieval_focus(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, params: SparsityParams
) -> torch.Tensor:
    """How sharply each query's full attention picks one distant block, the highest over the KV heads.

    Over the ranked blocks that lie wholly before the query's window: the largest block mass over their
    mean mass (1 when attention is spread evenly, up to their number when it falls on one block), 0 with
    fewer than two such blocks.  A ratio, so that early positions, whose blocks each hold more of a
    diffuse query's mass, are not preferred.  One sequence: q (T, Hq, Dk), k (T, Hkv, Dk), positions (P,).
    Returns (P,) float32.
    """
    num_blocks = num_selection_blocks(k.shape[0], params.block_size)
    ends = (torch.arange(num_blocks, device=k.device) + 1) * params.block_size
    size = _chunk(q, k)
    parts = []
    with torch.autocast(q.device.type, enabled=False):  # float32 scores, not autocast's half
        for start in range(0, positions.shape[0], size):
            at = positions[start : start + size]
            distant = ranked_blocks(at, num_blocks, params) & (ends <= at[:, None] - params.window + 1)
            mass = block_attention_mass(q[at], k, at, params) * distant[:, None]
            count = distant.sum(dim=-1, keepdim=True)
            focus = mass.amax(dim=-1) * count / mass.sum(dim=-1).clamp_min(1e-30)
            parts.append(torch.where(count >= 2, focus, 0.0).amax(dim=-1))
    return torch.cat(parts)


def selection_kl(
    q: torch.Tensor, k: torch.Tensor, k_cmp: torch.Tensor, positions: torch.Tensor, params: SparsityParams
) -> torch.Tensor:
    """KL(full attention's block masses ‖ eq. 9 importance) over the blocks each query's selection ranks.

    One sequence: q (T, Hq, Dk), k (T, Hkv, Dk) the selection keys, k_cmp (Tc, Hkv, Dk) the compressed
    keys, positions (P,) with every position ≥ first_ranked_position(params).  Both distributions are
    renormalised over blocks 1 … ⌊t/l'⌋ − 2.  Returns the KL of each (position, KV head): (P, Hkv),
    with a gradient with respect to k_cmp only.
    """
    num_blocks = num_selection_blocks(k.shape[0], params.block_size)
    ranked = ranked_blocks(positions, num_blocks, params)[:, None, :]
    size = _chunk(q, k)
    parts = []
    for start in range(0, positions.shape[0], size):
        at = positions[start : start + size]
        queries = q[at].detach()
        with torch.no_grad():
            target = block_attention_mass(queries, k.detach(), at, params) * ranked[start : start + size]
            target = target / target.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        importance = (
            compressed_importance(queries, k_cmp, at, num_blocks, params) * ranked[start : start + size]
        )
        log_student = torch.log(importance.clamp_min(1e-30)) - torch.log(
            importance.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        )
        parts.append((torch.special.xlogy(target, target) - target * log_student).sum(dim=-1))
    return torch.cat(parts)


def sample_positions(lengths: list[int], count: int, params: SparsityParams) -> list[torch.Tensor]:
    """Up to `count` distinct query positions drawn uniformly over the sequences' ranked positions.

    lengths: the tokens of each sequence (document).  Returns one LongTensor of positions per sequence
    (CPU, sorted, possibly empty).  Draws from torch's global CPU generator, which activation checkpointing
    restores before it recomputes a layer, so the recomputation samples the same positions.
    """
    first = first_ranked_position(params)
    eligible = torch.tensor([max(0, length - first) for length in lengths])
    total = int(eligible.sum())
    chosen = torch.randperm(total)[: min(count, total)].sort().values
    offsets = torch.cumsum(eligible, 0) - eligible
    owner = torch.searchsorted(torch.cumsum(eligible, 0), chosen, right=True)
    local = chosen - offsets[owner] + first
    return [local[owner == i] for i in range(len(lengths))]


def distillation_term(
    q: torch.Tensor,
    k: torch.Tensor,
    k_cmp_raw: torch.Tensor,
    documents: list[tuple[int, int]],
    count: int,
    compressor: BlockCompressor,
    params: SparsityParams,
    pool: int = 1,
) -> torch.Tensor:
    """The mean selection KL over `count` query positions sampled across the documents of one call.

    q (N, Hq, Dk), k (N, Hkv, Dk) selection keys and k_cmp_raw (N, Hkv, Dk) the compression branch's keys,
    tokens flattened; documents: (start, length) of each sequence in them; compressor: the layer's φ_K,
    applied to each sampled document's detached keys; pool: draw pool × count positions and keep the
    count with the highest `retrieval_focus`.  0 (no gradient) when no document is long enough.
    """
    total, terms = q.new_zeros((), dtype=torch.float32), 0
    positions = sample_positions([length for _, length in documents], count * pool, params)
    if pool > 1 and sum(at.numel() for at in positions) > count:
        positions = _most_focused(q, k, documents, positions, count, params)
    for (start, _), at in zip(documents, positions, strict=True):
        if at.numel() == 0:
            continue
        span = slice(start, start + int(at.max()) + 1)  # later tokens are in every sampled query's future
        with torch.autocast(q.device.type, enabled=False):  # float32 scores, not autocast's half
            k_cmp = compressor(k_cmp_raw[span].detach().to(compressor.pos.dtype)[None])[0]
            kl = selection_kl(q[span], k[span], k_cmp, at.to(q.device), params)
        total, terms = total + kl.sum(), terms + kl.numel()
    return total / max(terms, 1)


def _most_focused(
    q: torch.Tensor,
    k: torch.Tensor,
    documents: list[tuple[int, int]],
    positions: list[torch.Tensor],
    count: int,
    params: SparsityParams,
) -> list[torch.Tensor]:
    """Of the positions drawn in each document, the `count` with the highest retrieval focus over all
    documents (ties to the earlier document, then position), per document and sorted.  Activation
    checkpointing recomputes the choice from the same inputs, with the same result."""
    focus = [torch.zeros(0, device=q.device)]
    for (start, _), at in zip(documents, positions, strict=True):
        if at.numel():
            span = slice(start, start + int(at.max()) + 1)
            focus.append(retrieval_focus(q[span], k[span], at.to(q.device), params))
    order = torch.cat(focus).cpu().argsort(descending=True, stable=True)
    keep = torch.zeros(order.numel(), dtype=torch.bool)
    keep[order[:count]] = True
    masks = keep.split([at.numel() for at in positions])
    return [at[mask] for at, mask in zip(positions, masks, strict=True)]
