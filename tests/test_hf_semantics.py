"""docs/design.md#compression-trigger through transformers: the cache against an independent loop.

The loop below does not use transformers' caches, masks or attention functions, nor lococo's
cache: it runs the model's own weights layer by layer, keeps per-layer K/V, compresses with
``lococo.reference.fuse_kv`` when more than M + beta entries are stored, attends with every slot
visible and the new entries causal, and keeps the latest call's summed probabilities as scores.
"""

from __future__ import annotations

import pytest
import torch
from slot_loop import layer_qkv

import lococo
from lococo import reference

from hf_models import random_ids, tiny_compressor, tiny_model


def spec_loop(model, compressor, input_ids, chunk, detach_between_chunks=False):
    """Logits [b, T, V] and the final per-layer (K, V) of the chunked forward of docs/design.md#compression-trigger.

    With ``detach_between_chunks`` the stored entries are cut from autograd after every chunk
    (docs/design.md#the-original-recipe).
    """
    cfg = compressor.config
    M, beta, H, l = cfg.num_slots, cfg.beta, cfg.num_heavy, cfg.num_local
    inner = model.model
    b, T = input_ids.shape
    n_layers = len(inner.layers)
    K, V, S = [None] * n_layers, [None] * n_layers, [None] * n_layers
    pure_conv = not compressor.needs_scores()
    all_logits = []
    for start in range(0, T, chunk):
        ids = input_ids[:, start:start + chunk]
        q = ids.shape[1]
        x = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(x, torch.arange(start, start + q).unsqueeze(0))
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            d = attn.head_dim
            qs, ks, vs = layer_qkv(layer, x, cos, sin)
            if K[i] is not None and K[i].shape[2] > M + beta:
                c = compressor[i]
                scores = torch.zeros(K[i].shape[:3]) if pure_conv else S[i]
                K[i], V[i] = reference.fuse_kv(K[i], V[i], K[i][:, :, :0], V[i][:, :, :0], scores, c.weight,
                                               c.bias, c.alpha, H, l)
            K[i] = ks if K[i] is None else torch.cat([K[i], ks], 2)
            V[i] = vs if V[i] is None else torch.cat([V[i], vs], 2)
            L, stored = K[i].shape[2], K[i].shape[2] - q
            kvh = K[i].shape[1]
            g = qs.shape[1] // kvh
            logits = torch.einsum("bkgqd,bkld->bkgql", qs.reshape(b, kvh, g, q, d), K[i]) * d ** -0.5
            visible = torch.arange(L) < stored + torch.arange(q).unsqueeze(-1) + 1   # slots, then causal
            p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
            S[i] = p.sum((2, 3)).detach()
            out = torch.einsum("bkgql,bkld->bqkgd", p, V[i]).reshape(b, q, -1)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        all_logits.append(model.lm_head(inner.norm(x)))
        if detach_between_chunks:
            K, V = [k.detach() for k in K], [v.detach() for v in V]
    return torch.cat(all_logits, 1), K, V


CASES = [
    # arch, attention, compressor fields, chunk
    ("llama", "sdpa", {}, 8),
    ("llama", "eager", {}, 8),
    ("llama", "sdpa", {"num_local": 2, "num_slots": 10, "beta": 0}, 5),
    ("llama", "sdpa", {"rho": 1.0, "alpha_init": 1.0}, 7),          # pure convolution, no scores
    ("qwen3", "sdpa", {"kernel_size": 1}, 16),
    ("qwen2", "eager", {}, 3),
]


@pytest.mark.parametrize("arch,attn,fields,chunk", CASES)
def test_chunked_forward_matches_spec_loop(arch, attn, fields, chunk):
    model = tiny_model(arch, attn, seed=1)
    compressor = tiny_compressor(model, seed=2, **fields)
    lococo.apply_lococo(model, compressor)
    ids = random_ids(2, 61, seed=3)
    cache = lococo.LoCoCoCache(compressor)
    with torch.no_grad():
        got = lococo.chunked_nll(model, ids, cache, chunk, return_logits=True)
        want_logits, want_k, want_v = spec_loop(model, compressor, ids, chunk)
    assert cache.num_compressions > 2, "the test must exercise compression"
    torch.testing.assert_close(got.logits, want_logits, rtol=1e-4, atol=1e-4)
    for layer, k, v in zip(cache.layers, want_k, want_v):
        torch.testing.assert_close(layer.keys, k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.values, v, rtol=1e-4, atol=1e-4)
    want_nll = torch.nn.functional.cross_entropy(want_logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    torch.testing.assert_close(got.nll, want_nll, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 61


def test_pure_convolution_keeps_the_backend():
    model = tiny_model("llama", "sdpa")
    compressor = tiny_compressor(model, rho=1.0, alpha_init=1.0)
    lococo.apply_lococo(model, compressor)
    assert model.config._attn_implementation == "sdpa"
    compressor_h2o_mix = tiny_compressor(model, rho=1.0, alpha_init=0.5)   # alpha != 1 needs scores
    lococo.apply_lococo(model, compressor_h2o_mix)
    assert model.config._attn_implementation == "lococo_sdpa"


def test_gradients_reach_the_compressor_with_the_cache_detached():
    model = tiny_model("llama", "sdpa", seed=4)
    model.requires_grad_(False)
    compressor = tiny_compressor(model, seed=5, num_local=1)
    with torch.no_grad():   # a mixed case: alpha neither 0.5 nor equal across layers, a non-zero bias
        for layer, alpha in zip(compressor.layers, (0.3, 0.7)):
            layer.alpha.fill_(alpha)
            layer.bias.normal_(0.0, 0.5)
    lococo.apply_lococo(model, compressor)
    ids = random_ids(1, 48, seed=6)
    cache = lococo.LoCoCoCache(compressor)
    grads = []
    total = [torch.zeros_like(p) for p in compressor.parameters()]
    for chunk in lococo.iter_chunks(model, ids, cache, 16):
        assert not cache.layers[0].keys.requires_grad, "the cache must be detached between chunks"
        if chunk.loss.requires_grad:
            chunk.loss.backward()
            grads.append([p.grad.abs().sum().item() for p in compressor.parameters()])
            for acc, p in zip(total, compressor.parameters()):
                acc += p.grad
            compressor.zero_grad(set_to_none=False)
    # chunk 1 stores 16 entries (no compression), chunks 2 and 3 compress at their start
    assert len(grads) == 2
    assert all(g > 0 for per_chunk in grads for g in per_chunk), grads

    # The same gradient from the loop above with the reference op (autograd through it): the
    # sum over chunks of each chunk's mean NLL, the stored entries cut between chunks
    logits, _, _ = spec_loop(model, compressor, ids, 16, detach_between_chunks=True)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    loss = sum(nll[start:start + 16].mean() for start in range(0, 48, 16))
    want = torch.autograd.grad(loss, list(compressor.parameters()))
    for (name, _), got, expected in zip(compressor.named_parameters(), total, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)
