"""Packed documents through a loaded converted model: the same logits and NSA gradients as each one alone.

Geometry: l = 8, d = 4, l' = 16, n = 4, w = 64; documents of 90 (beyond the window and n·l'), 5 (shorter
than one compressed block) and 41 tokens, packed as transformers' DataCollatorWithFlattening packs them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

import nsa_convert
from nsa_convert.api import nsa_modules
from nsa_convert.nn import install
from nsa_convert.nn.install import packed_documents
from tests.models import VOCAB, relative_error

LENGTHS = (90, 5, 41)


def load(path, rng):
    """The converted model with every NSA parameter moved off its initialisation, so every branch counts."""
    model = nsa_convert.load(path, dtype=torch.float32).train()
    with torch.no_grad():
        for module in nsa_modules(model).values():
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=rng) * 0.2)
    return model


def nsa_parameters(model):
    return {
        f"{path}.{name}": param
        for path, module in nsa_modules(model).items()
        for name, param in module.named_parameters()
    }


def logits_and_gradients(model, weights, **batch):
    """Logits of one call and the NSA parameters' gradients of sum(logits · weights)."""
    model.zero_grad()
    logits = model(**batch, use_cache=False).logits[0]
    (logits * weights).sum().backward()
    return logits.detach(), {name: param.grad.clone() for name, param in nsa_parameters(model).items()}


def packed_batch(rng, flash_kwargs=False, labels=False):
    """Random documents of LENGTHS and their batch as DataCollatorWithFlattening packs them."""
    documents = [torch.randint(1, VOCAB, (n,), generator=rng) for n in LENGTHS]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_tensors="pt")
    batch = collator([{"input_ids": doc.tolist()} for doc in documents])
    if not labels:
        batch.pop("labels")
    return documents, batch


def block_diagonal(document: torch.Tensor) -> torch.Tensor:
    """The (1, 1, T, T) causal mask of the documents `document` (T,) numbers."""
    i = torch.arange(len(document))
    return ((i[None, :] <= i[:, None]) & (document[None, :] == document[:, None]))[None, None]


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_documents_match_each_document_alone(small_converted, rng, flash_kwargs):
    model = load(small_converted, rng)
    documents, batch = packed_batch(rng, flash_kwargs)
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and ("cu_seq_lens_q" in batch) == flash_kwargs
    weights = torch.randn(sum(LENGTHS), VOCAB, generator=rng)
    packed_logits, packed_grads = logits_and_gradients(model, weights, **batch)

    alone_grads = dict.fromkeys(packed_grads, 0.0)
    start = 0
    for doc in documents:
        rows = slice(start, start + len(doc))
        logits, grads = logits_and_gradients(model, weights[rows], input_ids=doc[None])
        assert relative_error(packed_logits[rows], logits) <= 1e-5
        for name, grad in grads.items():
            alone_grads[name] = alone_grads[name] + grad
        start += len(doc)
    # Per parameter up to float32 noise: compress_k's output bias, say, shifts every compressed score of a
    # query alike, so its true gradient is 0.
    scale = max(float(grad.abs().max()) for grad in packed_grads.values())
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, alone_grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    assert (
        relative_error(
            torch.cat([grad.flatten() for grad in packed_grads.values()]),
            torch.cat([grad.flatten() for grad in alone_grads.values()]),
        )
        <= 1e-5
    )


def test_packed_documents_from_position_ids():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    documents = packed_documents(None, 2, 6, 6, False, {"position_ids": positions})
    assert documents.tolist() == [0, 3, 5, 6, 10, 12]
    assert documents.dtype == torch.int32
    plain = torch.arange(6)[None]
    assert packed_documents(None, 2, 6, 6, False, {"position_ids": plain}) is None
    # A KV cache being filled: transformers does not look for packing either.
    assert packed_documents(None, 2, 6, 6, True, {"position_ids": positions}) is None


def test_position_ids_of_a_left_padded_batch_leave_its_mask_in_charge():
    """generate() gives padding tokens position 1: the restart there is padding, not a document."""
    positions = torch.tensor([[1, 1, 0, 1, 2]])
    i = torch.arange(5)
    mask = ((i[None, :] <= i[:, None]) & (i[None, :] >= 2))[None, None]
    assert packed_documents(mask, 1, 5, 5, False, {"position_ids": positions}) is None
    mask = block_diagonal(torch.tensor([0, 1, 2, 2, 2]))
    documents = packed_documents(mask, 1, 5, 5, False, {"position_ids": positions})
    assert documents.tolist() == [0, 1, 2, 5]


def test_flash_kwargs_are_refused_while_filling_a_cache():
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        packed_documents(None, 1, 6, 6, True, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu})
    with pytest.raises(ValueError, match="cu_seq_lens_k must equal"):
        packed_documents(
            None,
            1,
            6,
            6,
            False,
            {"cu_seq_lens_q": cu, "cu_seq_lens_k": torch.tensor([0, 2, 6], dtype=torch.int32)},
        )


def test_bf16_autocast_trains_packed_documents(small_converted, rng):
    """Under autocast q and k come out of the rotary embedding in float32, v in bf16: NSA runs in bf16."""
    model = load(small_converted, rng)
    _, batch = packed_batch(rng, labels=True)
    with torch.no_grad():
        expected = model(**batch, use_cache=False).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**batch, use_cache=False)
    output.loss.backward()
    # The dense model's own bf16 error on these inputs is about 2% per token. bf16 scores may also flip a
    # near-tie block selection, which moves a few tokens' logits entirely (up to 1.5× their norm in 1,600
    # draws; the whole-batch error then reached 0.136), so the bound is on the typical token: its median
    # error was at most 0.025 in those draws.
    per_token = (output.logits.float().detach() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert per_token.median() <= 0.05
    for name, param in nsa_parameters(model).items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.fixture
def mask_checks(monkeypatch):
    """The verdicts of every T × T mask check, in order."""
    checks = []
    check = install._block_diagonal_causal
    monkeypatch.setattr(install, "_block_diagonal_causal", lambda *a: checks.append(check(*a)) or checks[-1])
    return checks


def test_a_packed_forward_checks_its_mask_once(small_converted, rng, mask_checks):
    """Every layer gets the same mask and position ids: the T × T check runs once per forward, not per layer."""
    model = load(small_converted, rng)
    _, batch = packed_batch(rng)
    with torch.no_grad():
        model(**batch, use_cache=False)
        assert mask_checks == [True] and len(nsa_modules(model)) > 1
        model(**batch, use_cache=False)
    assert mask_checks == [True, True]  # each forward builds its own mask


def test_the_mask_verdict_is_redone_after_any_change(mask_checks):
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    mask = block_diagonal(torch.tensor([0, 0, 0, 1, 1]))
    for _ in range(2):
        assert packed_documents(mask, 1, 5, 5, False, {"position_ids": positions}).tolist() == [0, 3, 5]
    assert mask_checks == [True]
    positions.copy_(torch.tensor([[0, 1, 0, 1, 2]]))  # other documents: the old mask no longer fits them
    assert packed_documents(mask, 1, 5, 5, False, {"position_ids": positions}) is None
    mask.copy_(block_diagonal(torch.tensor([0, 0, 1, 1, 1])))  # now it does
    assert packed_documents(mask, 1, 5, 5, False, {"position_ids": positions}).tolist() == [0, 2, 5]
    causal = block_diagonal(torch.zeros(5, dtype=torch.long))  # another mask, the same position ids
    assert packed_documents(causal, 1, 5, 5, False, {"position_ids": positions}) is None
    assert mask_checks == [True, False, True, False]


def test_inference_mode_tensors_are_checked_every_time(mask_checks):
    """They have no version counter to tell whether they changed."""
    with torch.inference_mode():
        positions = torch.tensor([[0, 1, 2, 0, 1]])
        mask = block_diagonal(torch.tensor([0, 0, 0, 1, 1]))
        for _ in range(2):
            assert packed_documents(mask, 1, 5, 5, False, {"position_ids": positions}).tolist() == [0, 3, 5]
    assert mask_checks == [True, True]


def test_packed_documents_run_under_inference_mode(small_converted, rng):
    model = load(small_converted, rng)
    _, batch = packed_batch(rng)
    with torch.no_grad():
        expected = model(**batch, use_cache=False).logits
    with torch.inference_mode():
        assert torch.equal(model(**batch, use_cache=False).logits, expected)
