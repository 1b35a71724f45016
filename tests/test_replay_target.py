"""The layer-local error that `lococo distill` trains on, against the layer's own attention output.

The target of the replay is the full cache's attention output through the layer's output projection,
``O_full W_o^T``: here it is computed independently, by running ``model.model.layers[i].self_attn`` (the
transformers module, o_proj included) on the hidden states that enter the layer, and the replay's error
is recomputed from it chunk by chunk.
"""

from __future__ import annotations

import pytest
import torch

from lococo.recipes import distill

from hf_models import random_ids, spy_attention_outputs, tiny_compressor, tiny_model

LENGTH, CHUNK = 48, 5


def _layer_outputs(model, ids) -> list[torch.Tensor]:
    """Each layer's self-attention output [b, T, hidden] (after o_proj), from the transformers modules alone."""
    inner = model.model
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states   # hidden[i]: what enters layer i
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        outputs = []
        for i, layer in enumerate(inner.layers):
            x = layer.input_layernorm(hidden[i])
            cos, sin = inner.rotary_emb(x, positions)
            out = layer.self_attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
            outputs.append(out)
    return outputs


@pytest.mark.parametrize("index, alpha", [(0, None), (1, None), (1, 0.0)])   # alpha 0: --compare-every's H2O
def test_replay_error_is_relative_to_the_layers_own_attention_output(monkeypatch, index, alpha):
    model = tiny_model("llama", "sdpa", seed=90)
    ids = random_ids(2, LENGTH, seed=91)
    want = _layer_outputs(model, ids)[index]             # sdpa, causal: the full cache's output

    distill.register_capture()
    model.set_attn_implementation(distill.CAPTURE)
    records = distill.teacher_records(model, ids)
    attn = model.model.layers[index].self_attn
    w_o = attn.o_proj.weight.detach()
    # the record's output through W_o^T is the module's output
    query, _, _, recorded = records[index]
    b, heads, total, d = query.shape
    torch.testing.assert_close(recorded.reshape(b, total, heads * d) @ w_o.T, want, rtol=1e-4, atol=1e-5)

    outputs = spy_attention_outputs(monkeypatch)   # every chunk's attention output, as the replay computes it
    compressor = tiny_compressor(model, seed=92, chunk_size=CHUNK, slot_bias=True, alpha_init=0.3)
    error_sum, compressed = distill.replay_layer(compressor.layers[index], compressor.config, records[index], attn,
                                                 alpha=alpha)
    starts = range(0, LENGTH, CHUNK)
    assert len(outputs) == len(starts) and 0 < compressed < len(starts)

    expected = 0.0
    # the chunks from the first compression on, the only ones that count (nothing was lost before it)
    for start, out in list(zip(starts, outputs))[len(starts) - compressed:]:
        stop = min(LENGTH, start + CHUNK)
        target = want[:, start:stop]
        got = out.reshape(b, stop - start, heads * d) @ w_o.T
        expected += float((got - target).pow(2).sum() / target.pow(2).sum())
    assert expected > 1e-3                      # the cache lost something: a test of the target, not of zero
    assert error_sum == pytest.approx(expected, rel=1e-4)
