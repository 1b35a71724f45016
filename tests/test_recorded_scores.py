"""The scores that ``lococo_eager`` and ``lococo_sdpa`` hand a cache layer, against brute force.

Each function is called directly, the way transformers calls it, with the masks transformers' own
builders make for a left-padded batch (padded query rows see no key), GQA, a cache that already
holds entries, and decoding (one query).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers.masking_utils import eager_mask, sdpa_mask

from lococo.hf import attention

FUNCTIONS = {"lococo_eager": (attention.lococo_eager_attention, eager_mask),
             "lococo_sdpa": (attention.lococo_sdpa_attention, sdpa_mask)}


class Recorder:
    """Stands in for a fixed-slot cache layer: keeps what the attention function hands it."""

    def __init__(self):
        self.scores = None

    def record_scores(self, scores: torch.Tensor) -> None:
        self.scores = scores


def attention_module(heads: int, kv_heads: int) -> nn.Module:
    module = nn.Module().eval()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    return module


def brute_force(query, key, value, padding, q_offset: int, scaling: float):
    """Scores [b, kv_heads, L] and outputs [b, q, heads, d], one query head and one query at a time.

    Query i (at position q_offset + i) may see key j when j <= q_offset + i and padding[row, j] is 1;
    query head h reads KV head h // (heads / kv_heads). A query that sees no key adds nothing.
    """
    b, heads, q, d = query.shape
    kv_heads, L = key.shape[1], key.shape[2]
    scores = torch.zeros(b, kv_heads, L, dtype=torch.float64)
    outputs = torch.zeros(b, q, heads, d, dtype=torch.float64)
    for row in range(b):
        for head in range(heads):
            group = head // (heads // kv_heads)
            for i in range(q):
                seen = [j for j in range(L) if j <= q_offset + i and padding[row, j]]
                if not seen:
                    continue
                logits = torch.stack([query[row, head, i].double() @ key[row, group, j].double() for j in seen])
                p = torch.softmax(logits * scaling, dim=0)
                for j, pj in zip(seen, p):
                    scores[row, group, j] += pj
                    outputs[row, i, head] += pj * value[row, group, j].double()
    return scores, outputs


CASES = [
    # heads, kv_heads, queries, keys, pads per row, scaling
    (6, 2, 5, 9, [0, 6, 2], None),        # GQA, prefill into a cache; row 1's first 2 queries see nothing
    (4, 1, 7, 7, [3, 0], 0.3),            # MQA, no cache, explicit scaling
    (8, 4, 1, 11, [0, 4, 10], None),      # decoding, GQA
    (4, 4, 6, 6, [0, 0], None),           # no padding, no cache: sdpa gets no mask at all (is_causal)
    (4, 2, 1, 6, [0, 0], None),           # no padding, decoding: no mask either
]


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("heads,kv_heads,q,L,pads,scaling", CASES)
def test_recorded_scores_match_brute_force(name, heads, kv_heads, q, L, pads, scaling):
    function, make_mask = FUNCTIONS[name]
    gen = torch.Generator().manual_seed(heads * 100 + L)
    b, d = len(pads), 8
    query = torch.randn(b, heads, q, d, generator=gen)
    key = torch.randn(b, kv_heads, L, d, generator=gen) * 2
    value = torch.randn(b, kv_heads, L, d, generator=gen)
    padding = torch.ones(b, L, dtype=torch.long)
    for row, pad in enumerate(pads):
        padding[row, :pad] = 0
    mask = make_mask(batch_size=b, q_length=q, kv_length=L, q_offset=L - q, attention_mask=padding.bool())
    if name == "lococo_sdpa":
        assert (mask is None) == (not any(pads) and (q == 1 or q == L))

    layer = Recorder()
    attention.expect_scores(layer, key)
    output, _ = function(attention_module(heads, kv_heads), query, key, value, mask, scaling=scaling)

    want_scores, want_out = brute_force(query, key, value, padding, L - q, scaling or d ** -0.5)
    assert layer.scores is not None and layer.scores.dtype == torch.float32
    torch.testing.assert_close(layer.scores.double(), want_scores, rtol=1e-5, atol=1e-5)
    live = torch.tensor([[bool(padding[row, :L - q + i + 1].any()) for i in range(q)] for row in range(b)])
    torch.testing.assert_close(output[live].double(), want_out[live], rtol=1e-5, atol=1e-5)
    # every live query spreads a probability of 1 per query head over the keys it sees
    assert torch.allclose(layer.scores.sum((1, 2)), live.sum(1).float() * heads)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_scores_go_only_to_the_layer_that_gave_the_keys(name):
    function, make_mask = FUNCTIONS[name]
    query, key, value = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    padding = torch.ones(1, 5, dtype=torch.bool)
    mask = make_mask(batch_size=1, q_length=3, kv_length=5, q_offset=2, attention_mask=padding)
    layer = Recorder()
    attention.expect_scores(layer, key.clone())          # announced for other keys: not claimed
    function(attention_module(2, 1), query, key, value, mask)
    assert layer.scores is None
