"""Attention that reads quantized slots block by block (docs/design.md#quantized-slots).

A fixed-slot layer whose slots are stored in 8 or 4 bits hands the lococo attention functions only the
entries it holds in the model's dtype (those appended since the last compression) and the quantized
slots beside them. ``attention_over_slots`` then dequantizes ``SLOT_BLOCK`` slots at a time into a
float32 block, folds each block into an online softmax (running maximum, normaliser and weighted sum,
as FlashAttention does) and ends with the appended entries, so that no full-precision copy of the
layer's slots exists at any time. When the layer owes scores (H2O, TOVA and LoCoCo compress with them),
a second pass recomputes each block's logits and sums the normalised probabilities.

The result equals the attention over the dequantized slots concatenated with the appended entries
(the mask, the slot logits of a LoCoCo compressor, and queries that see no key at all giving zeros, as
``attention.biased_attention``), up to float32 rounding.
"""

from __future__ import annotations

import torch

__all__ = ["SLOT_BLOCK", "attention_over_slots"]

# slots dequantized at a time
SLOT_BLOCK = 256


def _blocks(slots, recent_k: torch.Tensor, recent_v: torch.Tensor):
    """(first column, keys, values) float32 [b, kv_heads, n, d]: the slots block by block, then the appended entries."""
    keys, values = slots
    n = keys.length
    step = keys.block_size(SLOT_BLOCK)
    if values.channel:
        step = values.block_size(step)
    for start in range(0, n, step):
        stop = min(n, start + step)
        yield start, keys.dequantize_slots(start, stop, torch.float32), values.dequantize_slots(start, stop,
                                                                                                torch.float32)
    yield n, recent_k.float(), recent_v.float()


def attention_over_slots(query: torch.Tensor, slots, recent_k: torch.Tensor, recent_v: torch.Tensor,
                         allowed: torch.Tensor | None, logit_bias: torch.Tensor | None, scaling: float,
                         want_scores: bool, last_query: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output [b, q, heads, d] in the query's dtype, scores [b, kv_heads, stored] float32 or None).

    ``slots``: the (keys, values) ``QuantizedTensor`` pair of the layer; ``recent_k``/``recent_v`` [b, kv_heads, r, d]
    the entries after them. ``allowed``: the mask over all columns (slots, then the appended entries) as booleans
    [b or 1, kv_heads or 1, groups or 1, q, kv] (``attention._grouped_allowed``), or None. ``logit_bias``
    [b, kv_heads, <= kv]: a logit per stored entry (None: none). ``last_query``: the scores of the last query alone.
    """
    b, num_heads, q_len, d = query.shape
    kv_heads = recent_k.shape[1]
    groups = num_heads // kv_heads
    grouped_q = query.reshape(b, kv_heads, groups * q_len, d).float()

    def logits_of(start: int, keys: torch.Tensor) -> torch.Tensor:
        n = keys.shape[-2]
        logits = torch.matmul(grouped_q, keys.transpose(-1, -2)).mul_(scaling).view(b, kv_heads, groups, q_len, n)
        if logit_bias is not None and start < logit_bias.shape[-1]:
            bias = logit_bias[..., start:start + n].float()
            logits = logits + torch.nn.functional.pad(bias, (0, n - bias.shape[-1])).view(b, kv_heads, 1, 1, n)
        if allowed is not None:
            logits = logits.masked_fill(~allowed[..., start:start + n], float("-inf"))
        return logits

    top = torch.full((b, kv_heads, groups, q_len, 1), float("-inf"), device=query.device)
    norm = torch.zeros_like(top)
    acc = torch.zeros(b, kv_heads, groups, q_len, d, device=query.device)
    for start, keys, values in _blocks(slots, recent_k, recent_v):
        logits = logits_of(start, keys)
        new_top = torch.maximum(top, logits.amax(-1, keepdim=True))
        shift = torch.where(torch.isinf(new_top), torch.zeros_like(new_top), new_top)   # rows with no key yet
        probs = torch.exp(logits - shift)
        rescale = torch.exp(top - shift)
        norm = norm * rescale + probs.sum(-1, keepdim=True)
        weighted = torch.matmul(probs.view(b, kv_heads, groups * q_len, -1), values)
        acc = acc * rescale + weighted.view(b, kv_heads, groups, q_len, d)
        top = new_top
    seen = norm > 0      # queries that see no key at all give zeros
    output = torch.where(seen, acc / torch.where(seen, norm, torch.ones_like(norm)), torch.zeros_like(acc))
    output = output.reshape(b, num_heads, q_len, d).transpose(1, 2).contiguous().to(query.dtype)
    if not want_scores:
        return output, None
    log_norm = torch.where(seen, torch.where(torch.isinf(top), torch.zeros_like(top), top) + norm.log(),
                           torch.full_like(norm, float("inf")))
    parts = []
    for start, keys, _ in _blocks(slots, recent_k, recent_v):
        probs = torch.exp(logits_of(start, keys) - log_norm)
        parts.append((probs[..., -1:, :] if last_query else probs).sum(dim=(2, 3)))
    return output, torch.cat(parts, dim=-1)
