"""nsa_attention_varlen: packed documents, each exactly as if alone (against the naive NSA and gradcheck)."""

import dataclasses

import pytest
import torch
from naive_nsa import naive_nsa, random_inputs

from nsa_convert import ops
from nsa_convert.nn.compression import BlockCompressor, packed_block_starts
from nsa_convert.spec import SparsityParams

# l = 4, d = 2, l' = 4, n = 4, w = 6: documents of 3 (shorter than l), 13 and 26 tokens cross every boundary.
TINY = SparsityParams(block_size=4, top_n=4, window=6, compress_block=4, compress_stride=2)
GEOMETRY = {name: value for name, value in dataclasses.asdict(TINY).items() if name != "scale"}


def packed_documents(rng, lengths, with_windows=False, **sizes):
    """Independent random inputs per document, and the same tensors packed with their cu_seqlens."""
    documents = [
        random_inputs(rng, TINY.resolved(sizes.get("head_dim", 8)), seq_len=n, windows=with_windows, **sizes)
        for n in lengths
    ]
    packed = {name: torch.cat([doc[name][0] for doc in documents]) for name in documents[0]}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return documents, packed, cu


def varlen(packed, cu, backend="reference"):
    windows = {name: packed[name] for name in ("k_win", "v_win") if name in packed}
    return ops.nsa_attention_varlen(
        *(packed[name] for name in ("q", "k", "v", "k_cmp", "v_cmp", "gates")),
        cu,
        **windows,
        **GEOMETRY,
        backend=backend,
    )


@pytest.mark.parametrize("with_windows", [False, True])
def test_each_document_matches_the_naive_nsa_alone(rng, with_windows):
    lengths = [13, 3, 26]
    documents, packed, cu = packed_documents(rng, lengths, with_windows, q_heads=4, kv_heads=2)
    out = varlen(packed, cu)
    assert out.shape == (sum(lengths), 4, 6)
    for doc, start, end in zip(documents, cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        expected, _ = naive_nsa(**doc, params=TINY.resolved(8))
        torch.testing.assert_close(out[start:end], expected[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_windows", [False, True])
def test_gradcheck(rng, with_windows):
    _, packed, cu = packed_documents(
        rng, [5, 3, 9], with_windows, q_heads=2, kv_heads=1, head_dim=2, value_dim=2
    )
    names = list(packed)
    leaves = [packed[name].requires_grad_() for name in names]

    def attention(*tensors):
        return varlen(dict(zip(names, tensors, strict=True)), cu)

    assert torch.autograd.gradcheck(attention, leaves)


def test_empty_documents_are_skipped(rng):
    _, packed, cu = packed_documents(rng, [7, 9])
    with_empty = torch.tensor([0, 0, 7, 7, 16], dtype=torch.int32)
    torch.testing.assert_close(varlen(packed, with_empty), varlen(packed, cu), rtol=0, atol=0)


def test_triton_backend_matches_reference(rng):
    """The varlen Triton kernels (under the interpreter on CPU) behind the same op, forward and backward."""
    pytest.importorskip("triton")
    _, packed, cu = packed_documents(rng, [21, 3, 40], True, q_heads=4, kv_heads=2, dtype=torch.float32)
    results = {}
    for backend in ("reference", "triton"):
        leaves = {name: x.detach().clone().requires_grad_() for name, x in packed.items()}
        out = varlen(leaves, cu, backend)
        out.backward(torch.ones_like(out) + torch.arange(out.numel()).view_as(out).sin())
        results[backend] = (out.detach(), {name: x.grad for name, x in leaves.items()})
    (out_ref, grads_ref), (out_tri, grads_tri) = results["reference"], results["triton"]
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-4, atol=1e-5)
    for name in packed:
        torch.testing.assert_close(grads_tri[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_opcheck(rng):
    """Schema, fake kernels and autograd registration of the varlen ops."""
    _, packed, cu = packed_documents(rng, [6, 3, 9], True, q_heads=4, kv_heads=2, head_dim=3, value_dim=2)
    cu_cmp = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    config = (*GEOMETRY.values(), 0.5, "reference")
    tensors = tuple(packed[name] for name in ("q", "k", "v", "k_cmp", "v_cmp", "gates", "k_win", "v_win"))
    for x in tensors:
        x.requires_grad_()
    torch.library.opcheck(
        torch.ops.nsa_convert.nsa_attention_varlen.default, (*tensors, cu, cu_cmp, 9, *config)
    )
    out, lse, indices = torch.ops.nsa_convert.nsa_attention_varlen(*tensors, cu, cu_cmp, 9, *config)
    grad_out = torch.randn(out.shape, generator=rng, dtype=out.dtype)
    detached = tuple(x.detach() for x in tensors)
    torch.library.opcheck(
        torch.ops.nsa_convert.nsa_attention_varlen_backward.default,
        (grad_out, *detached, out.detach(), lse, indices, cu, cu_cmp, 9, *config),
    )


def test_invalid_offsets_and_shapes_raise(rng):
    _, packed, cu = packed_documents(rng, [6, 9])
    with pytest.raises(ValueError, match="cu_seqlens must run from 0"):
        varlen(packed, torch.tensor([0, 6, 14], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen(packed, torch.tensor([0, 9, 6, 15], dtype=torch.int32))
    with pytest.raises(ValueError, match="k_cmp has shape"):
        varlen({**packed, "k_cmp": packed["k_cmp"][1:]}, cu)
    with pytest.raises(ValueError, match="3 dimensions"):
        varlen({**packed, "q": packed["q"][None]}, cu)


def test_packed_compression_equals_each_document_alone(rng):
    compressor = BlockCompressor(8, TINY.compress_block, TINY.compress_stride).double()
    with torch.no_grad():
        for param in compressor.parameters():
            param.normal_(0.0, 0.5, generator=rng)
    lengths = [3, 10, 4, 13]
    documents = [torch.randn(n, 2, 8, generator=rng, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    starts = packed_block_starts(cu, TINY.compress_block, TINY.compress_stride)
    assert starts.tolist() == [3, 5, 7, 9, 13, 17, 19, 21, 23, 25]
    packed = compressor.packed(torch.cat(documents), starts)
    alone = torch.cat([compressor(doc[None])[0] for doc in documents])
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
def test_triton_bf16_long_documents_match_each_document_alone(rng):
    """On the GPU at the paper's defaults: packed long documents (one shorter than a compression block)
    give each document's output and gradients of the single-sequence kernels run on it alone."""
    params = SparsityParams()
    geometry = {name: value for name, value in dataclasses.asdict(params).items() if name != "scale"}
    names = ("q", "k", "v", "k_cmp", "v_cmp", "gates")
    lengths = [3000, 20, 9000, 513]
    documents = [
        {
            name: x[0].to("cuda", torch.bfloat16)
            for name, x in random_inputs(
                rng,
                params.resolved(128),
                seq_len=n,
                q_heads=16,
                kv_heads=4,
                head_dim=128,
                value_dim=128,
                dtype=torch.float32,
            ).items()
        }
        for n in lengths
    ]
    packed = {name: torch.cat([doc[name] for doc in documents]).requires_grad_() for name in names}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out = ops.nsa_attention_varlen(*(packed[name] for name in names), cu, **geometry, backend="triton")
    grad_out = torch.randn(out.shape, generator=rng).to(out)
    out.backward(grad_out)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()

    starts = {"token": 0, "cmp": 0}
    for doc in documents:
        leaves = {name: doc[name].clone()[None].requires_grad_() for name in names}
        alone = ops.nsa_attention(*(leaves[name] for name in names), **geometry, backend="triton")
        t, tc = doc["q"].shape[0], doc["k_cmp"].shape[0]
        tokens, blocks = slice(starts["token"], starts["token"] + t), slice(starts["cmp"], starts["cmp"] + tc)
        alone.backward(grad_out[tokens][None])
        assert rel(out[tokens], alone[0]) < 1e-2, t
        for name in names:
            rows = blocks if name in ("k_cmp", "v_cmp") else tokens
            if leaves[name].grad[0].numel():
                assert rel(packed[name].grad[rows], leaves[name].grad[0]) < 1e-2, (t, name)
        starts = {"token": starts["token"] + t, "cmp": starts["cmp"] + tc}
