"""An independent fixed-slot cache, written from docs/design.md for the integration tests to compare with.

It uses none of transformers' caches, masks or attention functions and none of lococo's caches,
attention functions, reference or op: it runs a Llama-family model's own weights layer by layer,
keeps per-layer keys and values with an explicit valid flag per entry, compresses a row when
more than M + beta entries are stored (H2O, TOVA, StreamingLLM or LoCoCo, each written below one
row and one KV head at a time with plain Python ranking), attends with every valid slot visible and
the new entries causal, and keeps the latest call's summed probabilities as the scores (TOVA: the
last query's alone, and every head ranks by their sum over the heads).
"""

from __future__ import annotations

import pytest
import torch

apply_rotary_pos_emb = pytest.importorskip("transformers.models.llama.modeling_llama").apply_rotary_pos_emb


def layer_qkv(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A Llama-family decoder layer's queries and keys after RoPE and its values, [b, heads, q, d] each."""
    attn = layer.self_attn
    b, q, d = x.shape[0], x.shape[1], attn.head_dim
    h = layer.input_layernorm(x)
    qs = attn.q_proj(h).view(b, q, -1, d)
    ks = attn.k_proj(h).view(b, q, -1, d)
    vs = attn.v_proj(h).view(b, q, -1, d).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3
        qs, ks = attn.q_norm(qs), attn.k_norm(ks)
    qs, ks = apply_rotary_pos_emb(qs.transpose(1, 2), ks.transpose(1, 2), cos, sin)
    return qs, ks, vs


def best_first(scores: list[float], candidates) -> list[int]:
    """Candidates by score, larger first; ties to the lower index."""
    return sorted(candidates, key=lambda j: (-scores[j], j))


def h2o_keep(scores: list[float], num_slots: int, num_local: int) -> list[int]:
    """Indices (cache order) H2O keeps of n valid entries: the num_local last plus the best others."""
    n = len(scores)
    if n <= num_slots:
        return list(range(n))
    local = list(range(n - num_local, n))
    return sorted(best_first(scores, range(n - num_local))[:num_slots - num_local] + local)


def streaming_keep(n: int, num_slots: int, num_sink: int) -> list[int]:
    """Indices StreamingLLM keeps of n valid entries: the first num_sink and the most recent others."""
    if n <= num_slots:
        return list(range(n))
    return list(range(num_sink)) + list(range(n - (num_slots - num_sink), n))


def conv1d_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Z[c, t] = bias[c] + sum over taps o and features f of weight[c, f, o] * x[t + o - (k - 1) / 2, f].

    x [n, f]; zeros outside the sequence ("same" padding). Written as explicit windows.
    """
    n, features = x.shape
    k = weight.shape[-1]
    pad = x.new_zeros((k - 1) // 2, features)
    padded = torch.cat([pad, x, pad])
    windows = torch.stack([padded[t:t + k] for t in range(n)])           # [n, k, f]
    return torch.einsum("tof,cfo->ct", windows, weight) + bias[:, None]


def lococo_slots(keys, values, scores: list[float], weight, bias, alpha: float, num_heavy: int, num_local: int):
    """LoCoCo's compression of one row and one KV head, step by step (keys/values [n, d] valid entries).

    Returns keys and values [M, d]: the heavy hitters in cache order, then the fused slots.
    """
    n = keys.shape[0]
    num_fused = weight.shape[0]
    local = list(range(n - num_local, n))
    heavy = sorted(local + best_first(scores, range(n - num_local))[:num_heavy - num_local])
    rest = [j for j in range(n) if j not in heavy]
    rest_scores = [scores[j] for j in rest]
    picks = sorted(best_first(rest_scores, range(len(rest)))[:num_fused])
    one_hot = keys.new_zeros(num_fused, len(rest))
    for slot, pick in enumerate(picks):
        one_hot[slot, pick] = 1.0
    k_rest, v_rest = keys[rest], values[rest]
    z = conv1d_same(torch.cat([k_rest, v_rest], dim=-1), weight, bias)
    mix = (1 - alpha) * one_hot + alpha * torch.softmax(torch.relu(z), dim=-1)
    return torch.cat([keys[heavy], mix @ k_rest]), torch.cat([values[heavy], mix @ v_rest])


class SlotLoop:
    """A fixed-slot cache and the model's forward, step by step.

    ``policy`` is "h2o" or "tova" (``num_local``), "streaming" (``num_sink``) or "lococo" (``compressor``).
    ``num_slots`` is one M for every layer or a list with one per layer (per-layer budgets).
    ``round_slots(keys, values)``, when given, rounds the slots of each compression ([b, h, M, d] each) as
    a quantized storage would (``test_quantized_slots.rounded``).
    """

    def __init__(self, model, policy: str, num_slots: int, beta: int, num_local: int = 0, num_sink: int = 4,
                 compressor=None, round_slots=None):
        self.model, self.policy = model, policy
        n_layers = len(model.model.layers)
        self.slots = list(num_slots) if isinstance(num_slots, (list, tuple)) else [num_slots] * n_layers
        self.beta = beta
        self.num_local, self.num_sink, self.compressor = num_local, num_sink, compressor
        self.keys: list[torch.Tensor | None] = [None] * n_layers     # [b, kv_heads, L, d]
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.valid: list[torch.Tensor | None] = [None] * n_layers    # [b, L] bool
        self.scores: list[torch.Tensor | None] = [None] * n_layers   # [b, kv_heads, L], latest call
        self.compressions = [0] * n_layers
        self.round_slots = round_slots
        # a model that mixes sliding-window and full-attention layers: its sliding-window layers keep every entry
        # and attend within the window (counted in cache positions, padding included), never compressed
        types = list(getattr(model.config, "layer_types", None) or [])
        mixed = "full_attention" in types and "sliding_attention" in types
        self.windows = [model.config.sliding_window if mixed and t == "sliding_attention" else None
                        for t in types] if mixed else [None] * n_layers

    @property
    def num_compressions(self) -> int:
        return max(self.compressions)

    def _keep_row(self, layer: int, keys, values, scores):
        """keys/values [h, n, d] and scores [h, n] of one row's valid entries -> kept [h, m, d] each."""
        out_k, out_v = [], []
        M = self.slots[layer]
        for head in range(keys.shape[0]):
            k, v, s = keys[head], values[head], scores[head].tolist()
            if self.policy == "lococo" and len(s) >= M:
                kept_k, kept_v = self._lococo(layer, k, v, s)
            elif self.policy == "lococo":          # fewer valid entries than slots: all kept
                kept_k, kept_v = k, v
            else:
                if self.policy == "h2o":
                    index = h2o_keep(s, M, self.num_local)
                elif self.policy == "tova":                # one ranking for all heads
                    index = h2o_keep(scores.sum(0).tolist(), M, self.num_local)
                else:
                    index = streaming_keep(len(s), M, self.num_sink)
                kept_k, kept_v = k[index], v[index]
            out_k.append(kept_k)
            out_v.append(kept_v)
        return torch.stack(out_k), torch.stack(out_v)

    def _lococo(self, layer: int, keys, values, scores: list[float]):
        c, config = self.compressor[layer], self.compressor.config.layer(layer)
        weight = c.weight.detach().double()
        bias = weight.new_zeros(weight.shape[0]) if c.bias is None else c.bias.detach().double()
        kept_k, kept_v = lococo_slots(keys.double(), values.double(), scores, weight, bias, float(c.alpha.detach()),
                                      config.num_heavy, config.num_local)
        return kept_k.to(keys.dtype), kept_v.to(values.dtype)

    def _compress(self, layer: int) -> None:
        keys, values, valid, scores = self.keys[layer], self.values[layer], self.valid[layer], self.scores[layer]
        b, h, _, d = keys.shape
        M = self.slots[layer]
        new_k, new_v = keys.new_zeros(b, h, M, d), values.new_zeros(b, h, M, d)
        new_valid = torch.zeros(b, M, dtype=torch.bool)
        for row in range(b):
            index = valid[row].nonzero().flatten()
            kept_k, kept_v = self._keep_row(layer, keys[row][:, index], values[row][:, index], scores[row][:, index])
            m = kept_k.shape[1]
            new_k[row, :, M - m:], new_v[row, :, M - m:] = kept_k, kept_v    # right-aligned, empty slots first
            new_valid[row, M - m:] = True
        if self.round_slots is not None:
            new_k, new_v = self.round_slots(new_k, new_v)
        self.keys[layer], self.values[layer], self.valid[layer] = new_k, new_v, new_valid
        self.compressions[layer] += 1

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [b, q, vocab] of the new tokens ``ids`` [b, q] (``valid`` False for left padding)."""
        inner = self.model.model
        b, q = ids.shape
        x = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(x, positions)
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            d = attn.head_dim
            qs, ks, vs = layer_qkv(layer, x, cos, sin)
            window = self.windows[i]
            if window is None and self.keys[i] is not None and self.keys[i].shape[2] > self.slots[i] + self.beta:
                self._compress(i)
            if self.keys[i] is None:
                self.keys[i], self.values[i], self.valid[i] = ks, vs, valid.clone()
            else:
                self.keys[i] = torch.cat([self.keys[i], ks], 2)
                self.values[i] = torch.cat([self.values[i], vs], 2)
                self.valid[i] = torch.cat([self.valid[i], valid], 1)
            K, V = self.keys[i], self.values[i]
            L, kvh = K.shape[2], K.shape[1]
            stored, groups = L - q, qs.shape[1] // kvh
            causal = torch.arange(L) < stored + torch.arange(q).unsqueeze(-1) + 1        # [q, L]
            allowed = causal & self.valid[i][:, None, :]                                   # [b, q, L]
            if window is not None:
                allowed = allowed & (stored + torch.arange(q).unsqueeze(-1) - torch.arange(L) < window)
            grouped = qs.reshape(b, kvh, groups, q, d)        # query heads of a KV group are contiguous
            logits = torch.einsum("bkgqd,bkld->bkgql", grouped, K) * attn.scaling
            p = torch.softmax(logits.masked_fill(~allowed[:, None, None], float("-inf")), dim=-1)
            p = p.nan_to_num(0.0)                              # a query that sees no key contributes nothing
            self.scores[i] = p[:, :, :, -1:].sum((2, 3)) if self.policy == "tova" else p.sum((2, 3))
            out = torch.einsum("bkgql,bkld->bqkgd", p, V).reshape(b, q, -1)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(inner.norm(x))

    def valid_entries(self, layer: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [kv_heads, n, d] of one row's valid entries in one layer, in cache order."""
        index = self.valid[layer][row].nonzero().flatten()
        return self.keys[layer][row][:, index], self.values[layer][row][:, index]


def assert_cache_matches_loop(cache, loop: SlotLoop, got_logits: torch.Tensor, want_logits: torch.Tensor,
                              mask: torch.Tensor) -> None:
    """Logits at the real positions, and each row's valid keys and values in every layer, equal the loop's."""
    real = mask.bool()
    torch.testing.assert_close(got_logits[real], want_logits[real], rtol=1e-4, atol=1e-4)
    for i, layer in enumerate(cache.layers):
        if loop.windows[i] is not None:
            continue
        for row in range(mask.shape[0]):
            n = int(layer.valid_len[row])
            want_k, want_v = loop.valid_entries(i, row)
            assert want_k.shape[1] == n
            torch.testing.assert_close(layer.keys[row, :, layer.stored_length - n:], want_k, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(layer.values[row, :, layer.stored_length - n:], want_v, rtol=1e-4, atol=1e-4)


def run_chunks(loop: SlotLoop, ids: torch.Tensor, mask: torch.Tensor, chunk: int, fed: int = 0) -> torch.Tensor:
    """Logits [b, T - fed, vocab] of a left-padded batch fed ``chunk`` tokens at a time.

    ``ids`` and ``mask`` [b, T] cover every token; the loop already holds the first ``fed``.
    """
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = [loop.forward(ids[:, s:s + chunk], mask[:, s:s + chunk].bool(), positions[:, s:s + chunk])
           for s in range(fed, ids.shape[1], chunk)]
    return torch.cat(out, 1)


def greedy_decode(loop: SlotLoop, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
           chunk: int | None = None, fed: int = 0) -> torch.Tensor:
    """Greedy decoding, one token per step after the prompt; returns [b, T + new_tokens].

    The loop already holds the first ``fed`` tokens of ``ids``; the rest is fed ``chunk`` at a time.
    """
    logits = run_chunks(loop, ids, mask, chunk or ids.shape[1] - fed, fed)
    next_position = mask.sum(-1, keepdim=True)
    seq = ids
    for step in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], 1)
        if step == new_tokens - 1:
            break
        logits = loop.forward(token, torch.ones_like(token, dtype=torch.bool), next_position)
        next_position = next_position + 1
    return seq


def left_padded(ids: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids with each row's first T - n tokens replaced by the pad token 0, and the 2D mask."""
    T = ids.shape[1]
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask
