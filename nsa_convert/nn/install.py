"""Install NSA into a transformers model in place, keeping its module tree.

Each converted attention module gains an `nsa` child (NSAttention).  A transformers attention
function named "nsa" routes converted modules through it and every other module through SDPA, so
layers kept dense (sliding-window ones, say) behave exactly as before.  A pre-hook on each converted
attention module gives its layer of the call's KV cache an NSACacheLayer, so generate() and
`model(ids, use_cache=True)` followed by decoding calls work with transformers' own DynamicCache.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from nsa_convert.config import NSAConfig
from nsa_convert.nn.attention import NSAttention
from nsa_convert.sites import AttentionSite, converted

ATTN_IMPLEMENTATION = "nsa"


def left_padding(mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor | None:
    """Left-padding tokens per sequence (B,) of a whole-sequence call's mask, or None when there are none.

    NSA is causal by construction: the only mask it takes is the causal mask of left-padded sequences
    (what generate() and tokenizers with padding_side="left" make); any other is refused rather than ignored.
    """
    if q_len != kv_len:
        raise NotImplementedError(
            "NSA layers got cached keys without their NSA cache layer: pass the cache as the model's "
            "cache keyword (past_key_values before transformers 5.25), or call it with use_cache=False"
        )
    if mask is None or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return None
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]
    pads = kv_len - allowed[:, -1].sum(dim=-1)
    i = torch.arange(q_len, device=allowed.device)[:, None]
    j = torch.arange(kv_len, device=allowed.device)[None, :]
    expected = (j <= i) & (j >= pads[:, None, None])
    # Rows of padding queries see nothing; some mask builders let them see everything instead: skip them.
    checked = (allowed == expected) | (i < pads[:, None, None])
    if not bool(checked.all()):
        raise ValueError(
            "NSA layers take causal attention over left-padded sequences; this call passed another mask "
            "(right padding or a custom mask)"
        )
    return pads if bool(pads.any()) else None


def packed_documents(
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    kv_len: int,
    caching: bool,
    kwargs: dict,
) -> torch.Tensor | None:
    """Offsets (S + 1,) int32 of the documents packed into a whole-sequence call, or None when not packed.

    Sources, as transformers' own attention functions read them: flash-attention kwargs cu_seq_lens_q/k
    (offsets in the B·T tokens, row after row), else position_ids that restart inside a row when no KV
    cache is filled (what DataCollatorWithFlattening produces; transformers' mask functions then build
    the block-diagonal causal mask, which must then be the mask passed).  Under torch.compile position
    ids are not inspected (that needs their values).
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None:
        if caching:
            raise NotImplementedError("packed documents cannot fill a KV cache: call with use_cache=False")
        if q_len != kv_len or (cu_k is not None and not torch.equal(cu_k, cu_q)):
            raise ValueError("NSA layers take packed self-attention: cu_seq_lens_k must equal cu_seq_lens_q")
        return cu_q.to(torch.int32)
    position_ids = kwargs.get("position_ids")
    if (
        position_ids is None
        or position_ids.dim() != 2
        or caching
        or q_len != kv_len
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    ):
        return None
    given = position_ids
    position_ids = position_ids.expand(batch, q_len)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    if attention_mask is not None and not _mask_marks_documents(attention_mask, given, starts):
        return None  # position ids of a left-padded batch, say: its mask decides
    flat = starts.flatten().nonzero().flatten()
    return torch.cat([flat, flat.new_tensor([batch * q_len])]).to(torch.int32)


_MASK_VERDICTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""position_ids tensor → (weak mask, both tensors' versions, verdict) of the last mask check."""


def _mask_marks_documents(mask: torch.Tensor, position_ids: torch.Tensor, starts: torch.Tensor) -> bool:
    """_block_diagonal_causal once per forward: every layer passes the same two tensors, so the verdict is
    kept per position_ids tensor and reused while both are the same, unmodified (in-place writes bump
    _version).  Tensors made under torch.inference_mode have no version counter: checked every time."""
    if mask.is_inference() or position_ids.is_inference():
        return _block_diagonal_causal(mask, starts)
    stamp = (position_ids._version, mask._version)
    known = _MASK_VERDICTS.get(position_ids)
    if known is not None and known[0]() is mask and known[1] == stamp:
        return known[2]
    verdict = _block_diagonal_causal(mask, starts)
    _MASK_VERDICTS[position_ids] = (weakref.ref(mask), stamp, verdict)
    return verdict


def _block_diagonal_causal(mask: torch.Tensor, starts: torch.Tensor) -> bool:
    """Whether the mask (B, 1, T, T) is the causal mask of the documents starting where `starts` (B, T) is
    true, each attending only within itself: a T × T comparison."""
    document = starts.cumsum(dim=-1)
    i = torch.arange(starts.shape[1], device=document.device)
    expected = (document[:, :, None] == document[:, None, :]) & (i[None, :, None] >= i[None, None, :])
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]
    return torch.equal(allowed.expand_as(expected), expected)


def nsa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: NSA for converted modules, SDPA for the rest.

    A converted module decodes from its NSACacheLayer once that holds earlier tokens (the attention mask is
    then not read: the prefill's padding stands); otherwise it runs packed documents one by one (see
    packed_documents) or whole sequences, filling the cache layer when there is one.
    """
    nsa = getattr(module, "nsa", None)
    if not isinstance(nsa, NSAttention):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    hidden, cache = nsa.take_hidden(), nsa.take_cache_layer()
    if cache is not None and cache.decoding:
        out = nsa.decode(query, hidden, cache)
    elif (
        documents := packed_documents(
            attention_mask, query.shape[0], query.shape[2], key.shape[2], cache is not None, kwargs
        )
    ) is not None:
        out = nsa.packed(query, key, value, hidden, documents)
    else:
        pads = left_padding(attention_mask, query.shape[2], key.shape[2])
        out = nsa(query, key, value, hidden, pads=pads, cache=cache)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make "nsa" a transformers attention implementation (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, nsa_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def build_site_module(
    model: nn.Module, site: AttentionSite, config: NSAConfig, *, placed: bool = True
) -> NSAttention:
    """A freshly initialised NSAttention for `site`, with independent projections copied from the dense ones.

    placed: move it to the device and dtype of its attention module's parameters (else CPU, float32).
    """
    key_proj = value_proj = None
    if config.branch_kv == "independent":
        key_proj, value_proj = model.get_submodule(site.key_proj), model.get_submodule(site.value_proj)
    module = NSAttention(site, config, key_proj, value_proj)
    if key_proj is not None and key_proj.weight.device.type != "meta":
        module.copy_dense_projections(key_proj, value_proj)
    if placed:
        reference = next(model.get_submodule(site.module).parameters())
        module.to(device=reference.device, dtype=reference.dtype)
    return module


def install_nsa(model: nn.Module, sites: list[AttentionSite], config: NSAConfig) -> list[NSAttention]:
    """Attach an `nsa` child to every converted site and switch the model to the "nsa" attention function.

    The new modules take the device and dtype of their attention module's parameters; their values are
    the conversion initialisation until a state dict is loaded into them.
    """
    register_attention()
    installed = []
    for site in converted(sites):
        nsa = build_site_module(model, site, config)
        model.get_submodule(site.module).add_module("nsa", nsa)
        model.get_submodule(site.query_proj).register_forward_pre_hook(nsa.capture_hidden)
        model.get_submodule(site.module).register_forward_pre_hook(nsa.attach_cache, with_kwargs=True)
        if nsa.independent:
            model.get_submodule(site.key_proj).register_forward_hook(nsa.widen_keys)
            model.get_submodule(site.value_proj).register_forward_hook(nsa.widen_values)
        installed.append(nsa)
    set_attn_implementation(model, ATTN_IMPLEMENTATION)
    return installed


def set_attn_implementation(model: nn.Module, name: str) -> None:
    """Point the model's config (and any sub-config) at attention implementation `name`."""
    config = model.config
    for sub in [config, *(getattr(config, key) for key in getattr(config, "sub_configs", {}))]:
        if sub is not None:
            sub._attn_implementation = name
