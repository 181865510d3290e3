"""NSAttention.selected_blocks: the blocks a loaded model's queries select, against the float64 loops."""

from __future__ import annotations

import torch

import nsa_convert
from nsa_convert.api import nsa_modules
from tests.models import VOCAB
from tests.naive_nsa import naive_select


def test_selected_blocks_are_the_spec_selection_of_each_layer(small_converted, rng):
    model = nsa_convert.load(small_converted, dtype=torch.float64)
    modules = nsa_modules(model)
    seen = {}
    for name, module in modules.items():
        with torch.no_grad():  # off the initialisation: independent branches' keys then differ from dense
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=rng, dtype=param.dtype) * 0.2)
        module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[:2]))
    ids = torch.randint(0, VOCAB, (2, 83), generator=rng)
    model(input_ids=ids, use_cache=False)
    assert set(seen) == set(modules)
    for name, module in modules.items():
        query, key = (x.detach() for x in seen[name])
        h = module.num_kv_heads
        # k's heads are (window, compressed, selected) when the branches have their own projections
        k_cmp = key[:, h : 2 * h] if module.independent else key
        with torch.no_grad():
            compressed = module.compress_k(k_cmp.transpose(1, 2))
        expected = naive_select(query.transpose(1, 2), compressed, module.params)
        blocks = module.selected_blocks(query, key)
        assert blocks.dtype == torch.long and blocks.shape == expected.shape
        assert (expected[:, -1] != -1).all(), "the last query must choose among more blocks than top_n"
        torch.testing.assert_close(blocks, expected, rtol=0, atol=0)
