"""generate() and cached decoding on converted tiny models, against recomputing the full sequence.

Geometry: l = 8, d = 4, l' = 16, n = 4, w = 64, so prompts of 40–70 tokens plus the generated ones cross
compression, selection and window boundaries.  The gates get random weights so that every branch counts.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import nsa_convert
from nsa_convert.api import nsa_modules
from nsa_convert.config import NSAConfig
from nsa_convert.nn.cache import NSACacheLayer
from tests.models import SMALL_NSA, VOCAB, make_checkpoint, relative_error

NEW_TOKENS = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def load(path, backend="auto"):
    model = nsa_convert.load(path, dtype=torch.float32, backend=backend).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for module in nsa_modules(model).values():
            module.gate.weight.normal_(0.0, 0.3)
            module.gate.bias.normal_(0.0, 0.5)
    return model


def cached_call(model, ids, cache, **kwargs):
    """model(ids) continuing `cache`: its keyword is `cache` from transformers 5.25 on, `past_key_values`
    before (still accepted, deprecated, until 5.40)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(ids, **{name: cache}, use_cache=True, **kwargs)


def cache_of(output):
    """The cache a call returned (`cache` from transformers 5.25 on, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def recompute_greedy(model, ids, steps):
    """Greedy tokens from the whole sequence each step, no cache."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def greedy(model, ids, **kwargs):
    return model.generate(
        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs
    )


def test_greedy_generate_equals_recomputing_the_sequence(small_converted):
    model = load(small_converted)
    ids = torch.randint(1, VOCAB, (1, 57))
    assert torch.equal(greedy(model, ids), recompute_greedy(model, ids, NEW_TOKENS))


def test_left_padded_batch_generates_each_prompt_alone(small_converted):
    model = load(small_converted)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (70, 45, 31)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt) :], mask[b, width - len(prompt) :] = prompt, 1
    batch = greedy(model, ids, attention_mask=mask)
    for b, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None])
        assert torch.equal(batch[b, width:], alone[0, len(prompt) :]), b


def test_sampling_uses_the_logits_of_the_full_sequence(small_converted):
    model = load(small_converted)
    ids = torch.randint(1, VOCAB, (2, 50))
    torch.manual_seed(1)
    result = model.generate(
        ids,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=True,
        top_k=20,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        full = model(result.sequences, use_cache=False).logits[:, 49:-1]
    for step, logits in enumerate(result.logits):
        assert relative_error(logits, full[:, step]) <= 1e-5, step


def test_cached_calls_with_several_new_tokens(small_converted):
    """model(ids, use_cache=True), then calls of 3, 1, 5 and 1 new tokens: the full sequence's logits."""
    model = load(small_converted)
    ids = torch.randint(1, VOCAB, (2, 60))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        out = model(ids[:, :50], use_cache=True)
        cache, start, pieces = cache_of(out), 50, [out.logits]
        for step in (3, 1, 5, 1):
            out = cached_call(model, ids[:, start : start + step], cache)
            pieces.append(out.logits)
            start += step
    assert relative_error(torch.cat(pieces, dim=1), expected) <= 1e-5
    layers = [layer for layer in cache.layers if isinstance(layer, NSACacheLayer)]
    assert len(layers) == len(nsa_modules(model)) and all(layer.get_seq_length() == 60 for layer in layers)
    k_cmp, _ = layers[0].compressed_kv()
    assert k_cmp.shape[1] == (60 - 8) // 4 + 1


def test_padding_masks(small_converted):
    """Left padding gives each sequence its own positions; any other mask is refused."""
    model = load(small_converted)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (40, 23)]
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, prompt in enumerate(prompts):
        ids[b, 40 - len(prompt) :], mask[b, 40 - len(prompt) :] = prompt, 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, use_cache=False).logits
        for b, prompt in enumerate(prompts):
            alone = model(prompt[None], use_cache=False).logits[0]
            assert relative_error(padded[b, 40 - len(prompt) :], alone) <= 1e-5
        with pytest.raises(ValueError, match="left-padded"):
            model(ids, attention_mask=mask.flip(1), use_cache=False)


def test_static_cache_is_refused(small_converted):
    model = load(small_converted)
    with pytest.raises(NotImplementedError, match="dynamic cache"):
        model.generate(torch.randint(1, VOCAB, (1, 20)), max_new_tokens=2, cache_implementation="static")


def test_triton_kernels_generate_like_the_reference(tmp_path):
    """Prefill with the training kernels, decode with the decode kernels (interpreter on CPU)."""
    source = make_checkpoint(tmp_path / "dense", "llama-g4", num_hidden_layers=1)
    nsa_convert.convert(source, tmp_path / "nsa", NSAConfig(**SMALL_NSA))
    ids = torch.randint(1, VOCAB, (2, 36))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = load(tmp_path / "nsa").generate(ids, **kwargs)
    assert torch.equal(load(tmp_path / "nsa", backend="triton").generate(ids, **kwargs), expected)


@pytest.mark.gpu
def test_gpu_cached_decoding_matches_the_full_sequence(tmp_path):
    """Triton backend on CUDA: prefill (training kernels), then 1- and 3-token cached calls (decode kernels)."""
    source = make_checkpoint(tmp_path / "dense", "llama-g4")
    nsa_convert.convert(source, tmp_path / "nsa", NSAConfig(**SMALL_NSA))
    model = load(tmp_path / "nsa", backend="triton").cuda()
    ids = torch.randint(1, VOCAB, (2, 90), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=False).logits
        out = model(ids[:, :70], attention_mask=mask[:, :70], use_cache=True)
        cache, start, pieces = cache_of(out), 70, [out.logits]
        for step in (1, 3, 1, 5, 1, 1, 3, 1, 1, 1, 1, 1):
            out = cached_call(
                model, ids[:, start : start + step], cache, attention_mask=mask[:, : start + step]
            )
            pieces.append(out.logits)
            start += step
    got = torch.cat(pieces, dim=1)
    assert relative_error(got[0], expected[0]) <= 1e-2
    assert relative_error(got[1, 13:], expected[1, 13:]) <= 1e-2
    generated = model.generate(ids[:1, :60], max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 76)
