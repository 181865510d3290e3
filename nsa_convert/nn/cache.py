"""The KV cache of an NSA layer: raw keys/values plus the compressed ones, extended incrementally.

transformers' attention modules call `past_key_values.update(k, v, layer_idx)` before the attention
function.  For a converted layer, `NSACacheLayer` takes the place of the DynamicLayer the cache (the
DynamicCache that `generate()` or the model builds) holds at that index, so nothing changes for the caller.
It keeps what NSA reads and nothing more:

- shared k/v: one raw K/V timeline serving selection and window (exactly the dense cache);
- independent k/v: the selection branch's full raw K/V, the window branch's last w − 1 tokens and the
  compression branch's last l − 1 (the tokens of a compressed block not yet complete);
- each sequence's compressed K/V, one new block whenever d new tokens complete one, φ run on that block only
  (by `kernels.compress` on the Triton backend: one launch, indices computed on the device).

Buffers grow geometrically (1.25×), so appending a token never copies the cache (DynamicLayer concatenates
every step).  Sequences of a batch may be left-padded to different lengths: all end at the same raw
position, so each is right-aligned in the raw buffers, and its compressed blocks are indexed from its own
first token.  The cache is for inference: it stores detached tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from nsa_convert.nn.compression import BlockCompressor
from nsa_convert.ops import resolve_backend
from nsa_convert.spec import SparsityParams, num_compressed_blocks

GROWTH = 1.25
"""Capacity factor applied when a buffer is full (at most 25% slack, O(1) amortised copies per token)."""
ROUND = 256
"""Capacities are multiples of this many tokens."""


def _capacity(needed: int) -> int:
    return ROUND * math.ceil(max(1, math.ceil(needed * GROWTH)) / ROUND)


class _Timeline:
    """Keys and values [B, H, capacity, D] of the raw positions first … end − 1 of the batch's timeline.

    keep=None holds every token.  Otherwise only the last `keep` tokens before each append are guaranteed:
    older ones are dropped whenever the buffer is full and gets compacted.
    """

    def __init__(self, keep: int | None):
        self.keep = keep
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.first = 0
        self.end = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        keys, values = keys.detach(), values.detach()
        n = keys.shape[2]
        if self.keys is None or self.values is None:
            start = 0 if self.keep is None else max(0, n - self.keep)
            self.keys, self.values = keys[:, :, start:], values[:, :, start:]
            if start:
                self.keys, self.values = self.keys.clone(), self.values.clone()
            self.first, self.end = start, n
            return
        if self.end - self.first + n > self.keys.shape[2]:
            start = self.first if self.keep is None else max(self.first, self.end - self.keep)
            live = self.end - start
            old = slice(start - self.first, self.end - self.first)
            grown = []
            for buffer in (self.keys, self.values):
                batch, heads, _, dim = buffer.shape
                new = buffer.new_empty(batch, heads, _capacity(live + n), dim)
                new[:, :, :live] = buffer[:, :, old]
                grown.append(new)
            self.keys, self.values = grown
            self.first = start
        offset = self.end - self.first
        self.keys[:, :, offset : offset + n] = keys
        self.values[:, :, offset : offset + n] = values
        self.end += n

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held tokens [B, H, end − first, D] (views, no copy)."""
        if self.keys is None or self.values is None:
            raise RuntimeError("the NSA cache layer holds no tokens yet")
        size = self.end - self.first
        return self.keys[:, :, :size], self.values[:, :, :size]

    def crop(self, end: int) -> None:
        """Forget the tokens from raw position `end` on."""
        if end < self.end and self.keep is not None and self.first > 0 and end - self.keep < self.first:
            raise ValueError(
                f"cannot crop the NSA cache to {end} tokens: only tokens from {self.first} on are kept"
            )
        self.end = max(self.first, min(end, self.end))

    def map_batch(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.keys is not None and self.values is not None:
            self.keys, self.values = function(self.keys), function(self.values)


class NSACacheLayer(DynamicLayer):
    """One converted layer's decoding state, in a transformers cache (see the module docstring).

    `update` stores the new tokens and returns them as given: for the first call (the prefill) they are the
    whole sequence, which the training kernels take; decoding calls read this layer instead.
    """

    def __init__(self, num_kv_heads: int, independent: bool, params: SparsityParams):
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.independent = independent
        self.params = params
        self.past_length = 0
        """Raw tokens held before the latest update: 0 during a prefill."""
        self.pads: list[int] = []
        """Left-padding tokens of each sequence (its first token's raw position)."""
        self._pads: torch.Tensor | None = None
        self._k_cmp: torch.Tensor | None = None
        self._v_cmp: torch.Tensor | None = None
        self._reset_timelines()

    def _reset_timelines(self) -> None:
        self._slc = _Timeline(None)
        if self.independent:
            self._win = _Timeline(self.params.window - 1)
            self._cmp = _Timeline(self.params.compress_block - 1)
        else:
            self._win = self._cmp = self._slc

    def _timelines(self) -> list[_Timeline]:
        return [self._slc, self._win, self._cmp] if self.independent else [self._slc]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens ([B, m·Hkv, n, D]: m = 3 branches (win, cmp, slc) when independent, else 1)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.past_length = self._slc.end
        if self.independent:
            h = self.num_kv_heads
            for i, timeline in enumerate((self._win, self._cmp, self._slc)):
                timeline.append(key_states[:, i * h : (i + 1) * h], value_states[:, i * h : (i + 1) * h])
        else:
            self._slc.append(key_states, value_states)
        self.keys, self.values = self._slc.view()
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self._slc.end

    def get_max_length(self) -> int:
        return -1

    @property
    def decoding(self) -> bool:
        """Whether the latest update extended earlier tokens (the NSA decode path) rather than starting."""
        return self.past_length > 0

    def _lengths(self, end: int) -> list[int]:
        return [end - pad for pad in self.pads]

    def _num_compressed(self, end: int) -> list[int]:
        length, stride = self.params.compress_block, self.params.compress_stride
        return [num_compressed_blocks(max(0, n), length, stride) for n in self._lengths(end)]

    def start(self, pads: torch.Tensor | None, k_cmp: torch.Tensor, v_cmp: torch.Tensor) -> None:
        """Record the prefill: each sequence's left padding and its compressed K/V [B, Tc, Hkv, D]."""
        batch = k_cmp.shape[0]
        self.pads = [0] * batch if pads is None else [int(p) for p in pads.tolist()]
        self._pads = torch.tensor(self.pads, dtype=torch.int32, device=k_cmp.device)
        self._k_cmp, self._v_cmp = (self._own(x.detach().transpose(1, 2)) for x in (k_cmp, v_cmp))

    @staticmethod
    def _own(x: torch.Tensor, needed: int = 0) -> torch.Tensor:
        """A copy of [B, H, T, D] with room for max(T, needed) and more (the prefill's tensors stay untouched)."""
        batch, heads, held, dim = x.shape
        new = x.new_empty(batch, heads, _capacity(max(held, needed)), dim)
        new[:, :, :held] = x
        return new

    def _reserve_compressed(self, count: int) -> None:
        if self._k_cmp is None or self._v_cmp is None:
            raise RuntimeError("the NSA cache layer has not seen its prefill")
        if count <= self._k_cmp.shape[2]:
            return
        self._k_cmp, self._v_cmp = (self._own(x, count) for x in (self._k_cmp, self._v_cmp))

    @torch.no_grad()
    def extend_compressed(
        self, compress_k: BlockCompressor, compress_v: BlockCompressor, backend: str = "auto"
    ) -> None:
        """Compress the blocks the latest update completed (per sequence: those with i·d + l − 1 < L_b).

        The Triton backend does it in one launch per φ with device-side indices (no host sync); the
        reference gathers the blocks and calls the modules.
        """
        before, after = self._num_compressed(self.past_length), self._num_compressed(self._slc.end)
        if before == after:
            return
        self._reserve_compressed(max(after))
        assert self._k_cmp is not None and self._v_cmp is not None and self._pads is not None
        keys, values = self._cmp.view()
        length, stride = self.params.compress_block, self.params.compress_stride
        if resolve_backend(backend, keys.device) == "triton":
            from nsa_convert.kernels.compress import compress_new_blocks

            n_new, first = self._slc.end - self.past_length, self._cmp.first
            for x, phi, out in ((keys, compress_k, self._k_cmp), (values, compress_v, self._v_cmp)):
                compress_new_blocks(x, first, self._pads, self._slc.end, n_new, stride, phi.weights(), out)
            return
        new = [(b, i) for b, (lo, hi) in enumerate(zip(before, after, strict=True)) for i in range(lo, hi)]
        device = keys.device
        batch_index = torch.tensor([b for b, _ in new], device=device)
        block_index = torch.tensor([i for _, i in new], device=device)
        starts = torch.tensor([self.pads[b] + i * stride - self._cmp.first for b, i in new], device=device)
        rows = starts[:, None] + torch.arange(length, device=device)
        # [N, l, H, D]: each new block as a sequence of l tokens, of which φ makes exactly one block.
        new_k = compress_k(keys[batch_index[:, None], :, rows])[:, 0]
        new_v = compress_v(values[batch_index[:, None], :, rows])[:, 0]
        self._k_cmp[batch_index, :, block_index] = new_k.to(self._k_cmp.dtype)
        self._v_cmp[batch_index, :, block_index] = new_v.to(self._v_cmp.dtype)

    def seq_lens(self) -> torch.Tensor:
        """(B,) int32: each sequence's tokens, the latest update included."""
        if self._pads is None:
            raise RuntimeError("the NSA cache layer has not seen its prefill")
        return self._slc.end - self._pads

    def selection_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw keys/values feeding selection (and the window when shared), [B, S, Hkv, D] views."""
        keys, values = self._slc.view()
        return keys.transpose(1, 2), values.transpose(1, 2)

    def window_kv(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """The window branch's own raw keys/values (independent k/v only), [B, S_w, Hkv, D] views."""
        if not self.independent:
            return None, None
        keys, values = self._win.view()
        return keys.transpose(1, 2), values.transpose(1, 2)

    def compressed_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed keys/values [B, Tcc, Hkv, D] views, Tcc = the most any sequence has."""
        if self._k_cmp is None or self._v_cmp is None:
            raise RuntimeError("the NSA cache layer has not seen its prefill")
        count = max(self._num_compressed(self._slc.end), default=0)
        return self._k_cmp[:, :, :count].transpose(1, 2), self._v_cmp[:, :, :count].transpose(1, 2)

    def nbytes(self) -> int:
        """Bytes of the tokens held (raw and compressed; capacity slack not counted)."""
        total = 0
        for timeline in self._timelines():
            if timeline.keys is not None:
                keys, values = timeline.view()
                total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        if self._k_cmp is not None and self._v_cmp is not None:
            k_cmp, v_cmp = self.compressed_kv()
            total += k_cmp.numel() * k_cmp.element_size() + v_cmp.numel() * v_cmp.element_size()
        return total

    def _map_batch(self, function: Callable[[torch.Tensor], torch.Tensor], pads: list[int]) -> None:
        for timeline in self._timelines():
            timeline.map_batch(function)
        if self._k_cmp is not None and self._v_cmp is not None:
            self._k_cmp, self._v_cmp = function(self._k_cmp), function(self._v_cmp)
        if self._pads is not None:
            self.pads = pads
            self._pads = torch.tensor(pads, dtype=torch.int32, device=self._pads.device)
        if self._slc.keys is not None:
            self.keys, self.values = self._slc.view()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        order = beam_idx.tolist()
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)), [self.pads[i] for i in order])

    def batch_repeat_interleave(self, repeats: int) -> None:
        pads = [pad for pad in self.pads for _ in range(repeats)]
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0), pads)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        chosen = torch.arange(len(self.pads))[torch.as_tensor(indices).cpu()].tolist()
        self._map_batch(lambda x: x[indices, ...], [self.pads[i] for i in chosen])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove tokens (a positive value is the length to keep, as transformers < 5.18)."""
        end = self._slc.end + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        if end >= self._slc.end:
            return
        for timeline in self._timelines():
            timeline.crop(end)
        self.past_length = min(self.past_length, end)
        if self._slc.keys is not None:
            self.keys, self.values = self._slc.view()

    def reset(self) -> None:
        self._reset_timelines()
        self.past_length = 0
        self.pads, self._pads, self._k_cmp, self._v_cmp = [], None, None, None
        self.keys = self.values = None
        self.is_initialized = False

    def offload(self) -> None:
        raise NotImplementedError("NSA cache layers stay on their device (no cache offloading)")

    def prefetch(self) -> None:
        raise NotImplementedError("NSA cache layers stay on their device (no cache offloading)")


def nsa_cache_layer(
    cache: Cache, layer_idx: int, num_kv_heads: int, independent: bool, params: SparsityParams
) -> NSACacheLayer:
    """The NSACacheLayer at `layer_idx` of `cache`, put in place of an unused DynamicLayer on first sight."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise NotImplementedError(
            f"NSA decoding needs a transformers Cache with layers, got {type(cache).__name__}"
        )
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    layer = layers[layer_idx]
    if isinstance(layer, NSACacheLayer):
        return layer
    if type(layer) is not DynamicLayer or layer.get_seq_length() > 0:
        raise NotImplementedError(
            f"NSA layer {layer_idx} decodes with a fresh dynamic cache (DynamicCache, the default of generate()); "
            f"this cache holds a {type(layer).__name__}"
            + (" that already has tokens" if type(layer) is DynamicLayer else "")
        )
    layers[layer_idx] = NSACacheLayer(num_kv_heads, independent, params)
    return layers[layer_idx]
