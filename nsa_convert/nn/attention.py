"""NSAttention: the new parameters of one converted site and the NSA computation on SDPA-layout tensors.

The rewritten FX graph calls this module in place of the SDPA node; the eager model calls it from the
attention function that `nsa_convert.nn.install` registers with transformers.  With a KV cache, a prefill
runs `forward` (the training op) and fills the layer's `NSACacheLayer`; later calls run `decode`.  Packed
documents (training on flattened batches) run `packed`, each document as if it were alone.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from nsa_convert.config import NSAConfig
from nsa_convert.nn.cache import NSACacheLayer, nsa_cache_layer
from nsa_convert.nn.compression import BlockCompressor, packed_block_starts
from nsa_convert.nn.distill import distillation_term
from nsa_convert.ops import nsa_attention, nsa_attention_varlen, nsa_decode, select_blocks
from nsa_convert.sites import AttentionSite


def _shift_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y[b, i] = x[b, i + shift[b]] (clamped to the sequence) for x [B, T, ...]: moves each sequence in time."""
    seq_len = x.shape[1]
    index = (torch.arange(seq_len, device=x.device)[None, :] + shift[:, None]).clamp(0, seq_len - 1)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


def _op_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype the op runs in: autocast's when autocast is on (SDPA's inputs are cast alike), else q's.

    Under autocast q and k leave the rotary embedding in float32 while v leaves its projection in bf16.
    Devices without autocast (meta, while a graph is exported) run in q's dtype.
    """
    device = query.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


def _linear_like(linear: nn.Module) -> nn.Linear:
    """An nn.Linear of the same shape (and bias) as a projection, for an independent branch's copy."""
    weight = linear.weight
    return nn.Linear(weight.shape[1], weight.shape[0], bias=getattr(linear, "bias", None) is not None)


class NSAttention(nn.Module):
    """Gates, compressors and (with branch_kv="independent") per-branch k/v projections of one site.

    forward takes the tensors the dense SDPA call took, q [B, Hq, T, Dk], k [B, m·Hkv, T, Dk],
    v [B, m·Hkv, T, Dv] (m = 3 when k/v carry the window, compressed and selected branches' heads
    stacked in that order, else 1), plus the hidden state x [B, T, hidden] that fed the query
    projection, and returns the attention output [B, Hq, T, Dv] as SDPA did.
    """

    def __init__(
        self,
        site: AttentionSite,
        config: NSAConfig,
        key_proj: nn.Module | None = None,
        value_proj: nn.Module | None = None,
    ):
        super().__init__()
        self.num_q_heads = site.num_q_heads
        self.num_kv_heads = site.num_kv_heads
        self.params = config.sparsity(site.scale)
        self.gate_cmp_logit = config.gate_cmp_logit
        self.independent = config.branch_kv == "independent"
        self.backend = "auto"
        self.gate = nn.Linear(site.hidden_size, 3 * site.num_q_heads)
        self.compress_k = BlockCompressor(
            site.head_dim, config.compress_block, config.compress_stride, config.compress_hidden
        )
        self.compress_v = BlockCompressor(
            site.v_head_dim, config.compress_block, config.compress_stride, config.compress_hidden
        )
        if self.independent:
            if key_proj is None or value_proj is None:
                raise ValueError(
                    f"{site.module}: branch_kv='independent' needs the dense k and v projections"
                )
            self.k_proj_cmp = _linear_like(key_proj)
            self.k_proj_slc = _linear_like(key_proj)
            self.v_proj_cmp = _linear_like(value_proj)
            self.v_proj_slc = _linear_like(value_proj)
        self._hidden: torch.Tensor | None = None
        self._cache_layer: NSACacheLayer | None = None
        self.distill_queries = 0
        self.distill_pool = 1
        self.distill_term: torch.Tensor | None = None
        self.reset_gate()

    @torch.no_grad()
    def reset_gate(self) -> None:
        """Zero weights; logits (gate_cmp_logit, 0, 0): selection and window at 0.5 each sum to 1 exactly."""
        self.gate.weight.zero_()
        self.gate.bias.zero_()
        self.gate.bias.view(self.num_q_heads, 3)[:, 0] = self.gate_cmp_logit

    @torch.no_grad()
    def copy_dense_projections(self, key_proj: nn.Module, value_proj: nn.Module) -> None:
        """Independent branches start as copies of the dense k/v projections."""
        for name, dense in (("k_proj", key_proj), ("v_proj", value_proj)):
            for branch in ("cmp", "slc"):
                getattr(self, f"{name}_{branch}").load_state_dict(dense.state_dict())

    def capture_hidden(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the query projection: keep x_t for the gates of this call."""
        self._hidden = args[0]

    def widen_keys(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the dense key projection: append the compressed and selected branches' heads.

        The attention module then views, normalises and rotates all 3·Hkv heads as it did the dense
        ones, and a KV cache stores each branch's keys.
        """
        return torch.cat([output, self.k_proj_cmp(args[0]), self.k_proj_slc(args[0])], dim=-1)

    def widen_values(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the dense value projection (see widen_keys)."""
        return torch.cat([output, self.v_proj_cmp(args[0]), self.v_proj_slc(args[0])], dim=-1)

    def attach_cache(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (with kwargs) on the attention module: put this layer's NSACacheLayer into the
        call's cache before the module updates it, and keep it for the attention function.  transformers
        5.25 renamed the attention modules' `past_key_values` keyword to `cache`: either is read."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            self._cache_layer = None
            return
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise NotImplementedError(
                f"{type(module).__name__} has no layer_idx: NSA cannot find its cache layer"
            )
        self._cache_layer = nsa_cache_layer(
            cache, layer_idx, self.num_kv_heads, self.independent, self.params
        )

    def take_cache_layer(self) -> NSACacheLayer | None:
        layer, self._cache_layer = self._cache_layer, None
        return layer

    def take_hidden(self) -> torch.Tensor:
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError("NSA gates need the hidden state; the query projection's hook did not run")
        return hidden

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, m·Hkv, T, D] → (window, compressed, selected) tensors in [B, T, Hkv, D] layout."""
        x = x.transpose(1, 2)
        if not self.independent:
            return x, x, x
        h = self.num_kv_heads
        return x[:, :, :h], x[:, :, h : 2 * h], x[:, :, 2 * h :]

    def _gates(self, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, T, Hq, 3] sigmoid gates (cmp, slc, win) from the hidden state that fed the query projection."""
        batch, seq_len = hidden.shape[:2]
        return torch.sigmoid(self.gate(hidden).float()).view(batch, seq_len, self.num_q_heads, 3).to(dtype)

    def _options(self) -> dict:
        """The geometry, scale and backend keywords of the ops."""
        params = self.params
        return {
            "block_size": params.block_size,
            "top_n": params.top_n,
            "window": params.window,
            "compress_block": params.compress_block,
            "compress_stride": params.compress_stride,
            "scale": params.scale,
            "backend": self.backend,
        }

    def _distill(
        self,
        q: torch.Tensor,
        k_slc: torch.Tensor,
        k_cmp: torch.Tensor,
        documents: list[tuple[int, int]],
        rows: int,
    ) -> None:
        """With selection distillation on (nsa_convert.nn.distill), keep this call's term: q, k_slc, k_cmp
        with the tokens of `rows` batch rows flattened, documents (start, length) in them."""
        self.distill_term = None
        if torch.is_grad_enabled():
            count = self.distill_queries * rows
            term = distillation_term(
                q, k_slc, k_cmp, documents, count, self.compress_k, self.params, self.distill_pool
            )
            # Checkpointing recomputes this call inside backward: the term must be recomputed (its saved
            # tensors are what backward unpacks) but not kept, or its graph would outlive the step.
            if torch._C._current_graph_task_id() == -1:
                self.distill_term = term

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        hidden: torch.Tensor,
        pads: torch.Tensor | None = None,
        cache: NSACacheLayer | None = None,
    ) -> torch.Tensor:
        """Whole sequences through the training op.

        pads (B,): left-padding tokens per sequence; each sequence is moved to start at position 0 (its
        NSA positions are its own), computed, and moved back, padding rows giving 0.  cache: the layer's
        NSACacheLayer, given the compressed K/V and padding for decoding after this prefill.
        """
        dtype = _op_dtype(query)
        query, key, value = (x.to(dtype) for x in (query, key, value))
        q = query.transpose(1, 2)
        gates = self._gates(hidden, dtype)
        k_win, k_cmp, k_slc = self._split(key)
        v_win, v_cmp, v_slc = self._split(value)
        if pads is not None:
            q, gates, k_win, k_cmp, k_slc, v_win, v_cmp, v_slc = (
                _shift_rows(x, pads) for x in (q, gates, k_win, k_cmp, k_slc, v_win, v_cmp, v_slc)
            )
        if self.distill_queries:
            batch, seq_len = q.shape[:2]
            lengths = [seq_len] * batch if pads is None else (seq_len - pads).tolist()
            self._distill(
                q.flatten(0, 1), k_slc.flatten(0, 1), k_cmp.flatten(0, 1),
                [(row * seq_len, length) for row, length in enumerate(lengths)], batch,
            )  # fmt: skip
        compressed_k, compressed_v = self.compress_k(k_cmp), self.compress_v(v_cmp)
        if cache is not None:
            cache.start(pads, compressed_k, compressed_v)
        out = nsa_attention(
            q,
            k_slc,
            v_slc,
            compressed_k,
            compressed_v,
            gates,
            k_win=k_win if self.independent else None,
            v_win=v_win if self.independent else None,
            **self._options(),
        )
        if pads is not None:
            out = _shift_rows(out, -pads)
            real = torch.arange(out.shape[1], device=out.device)[None, :] >= pads[:, None]
            out = torch.where(real[:, :, None, None], out, 0.0)
        return out.transpose(1, 2)

    @torch.no_grad()
    def selected_blocks(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The selection blocks `forward` attends to for its query and key (unpadded sequences).

        LongTensor (B, T, Hkv, top_n), sorted ascending, -1 padded: which block each query's KV group
        reads, for inspecting what a converted or trained model retrieves (the selection has no gradient,
        so training improves it only through the compressed branch).
        """
        dtype = _op_dtype(query)
        _, k_cmp, _ = self._split(key.to(dtype))
        options = {name: value for name, value in self._options().items() if name != "window"}
        return select_blocks(query.to(dtype).transpose(1, 2), self.compress_k(k_cmp), **options)

    def packed(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        hidden: torch.Tensor,
        documents: torch.Tensor,
    ) -> torch.Tensor:
        """Packed documents through the varlen op: each one compressed, selected and windowed as if alone.

        Takes forward's tensors; documents (S + 1,) int: the documents' offsets in the B·T tokens read
        row after row (flash-attention's cu_seqlens).
        """
        batch, _, seq_len, _ = query.shape
        dtype = _op_dtype(query)
        query, key, value = (x.to(dtype) for x in (query, key, value))

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch * seq_len, *x.shape[2:])

        q = flat(query.transpose(1, 2))
        gates = flat(self._gates(hidden, dtype))
        k_win, k_cmp, k_slc = (flat(x) for x in self._split(key))
        v_win, v_cmp, v_slc = (flat(x) for x in self._split(value))
        if self.distill_queries:
            offsets = documents.tolist()
            spans = [(start, stop - start) for start, stop in itertools.pairwise(offsets)]
            self._distill(q, k_slc, k_cmp, spans, batch)
        starts = packed_block_starts(documents, self.params.compress_block, self.params.compress_stride)
        out = nsa_attention_varlen(
            q,
            k_slc,
            v_slc,
            self.compress_k.packed(k_cmp, starts),
            self.compress_v.packed(v_cmp, starts),
            gates,
            documents,
            k_win=k_win if self.independent else None,
            v_win=v_win if self.independent else None,
            **self._options(),
        )
        return out.view(batch, seq_len, *out.shape[1:]).transpose(1, 2)

    def decode(self, query: torch.Tensor, hidden: torch.Tensor, cache: NSACacheLayer) -> torch.Tensor:
        """The newest tokens (query [B, Hq, n, Dk], already in `cache`) against the cache: [B, Hq, n, Dv].

        Compresses the blocks these tokens complete, then runs the decode op on the cache's views.
        """
        cache.extend_compressed(self.compress_k, self.compress_v, self.backend)
        k_slc, v_slc = cache.selection_kv()
        k_win, v_win = cache.window_kv()
        k_cmp, v_cmp = cache.compressed_kv()
        out = nsa_decode(
            query.transpose(1, 2),
            k_slc,
            v_slc,
            k_cmp,
            v_cmp,
            self._gates(hidden, query.dtype),
            cache.seq_lens(),
            k_win=k_win,
            v_win=v_win,
            **self._options(),
        )
        return out.transpose(1, 2)


def nsa_modules(model: nn.Module) -> dict[str, NSAttention]:
    """The NSAttention modules of a loaded model, keyed by their attention module's path."""
    return {name.removesuffix(".nsa"): m for name, m in model.named_modules() if isinstance(m, NSAttention)}
