"""Attention implementations that also produce the scores of docs/design.md#attention-scores.

``lococo_sdpa`` and ``lococo_eager`` are registered under their own names in transformers'
``AttentionInterface`` and ``AttentionMaskInterface`` (the mask entry is transformers' own sdpa or
eager mask builder: without it, transformers builds no mask at all for an unknown name). They
compute the same output as ``sdpa`` and ``eager`` and, when the keys they receive were just
returned by a fixed-slot cache layer, hand that layer the scores

    S[b, g, j] = sum over the call's queries i and the query heads h of KV group g of P[b, h, i, j]

where P are the softmax probabilities of the call (queries whose every key is masked, such as
left padding, contribute nothing). Only the latest call counts. A layer that sets
``scores_from_last_query`` (TOVA) gets the same sum over the call's last query alone.

The cache layer announces itself in ``update`` (``expect_scores``) and the attention function
claims it by the identity of the key tensor, so nothing is wrapped and no global table is touched.
A layer that carries attention logits for its stored entries (``logit_bias``: a LoCoCo cache whose
compressor learned a logit per fused slot) gets its attention from ``biased_attention`` instead of the
backend's kernel.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["ATTENTION_NAMES", "attention_scores", "register_attention", "scored_name"]

# Elements of the float32 [b, heads, queries, keys] score block computed at once.
SCORE_BLOCK_ELEMENTS = 1 << 24

_handoff = threading.local()


def expect_scores(layer, keys: torch.Tensor, scores: bool = True) -> None:
    """Called by a cache layer's ``update``: the next attention over ``keys`` is this layer's.

    It owes the layer scores when ``scores``, and adds the layer's ``logit_bias`` (when not None) to
    the attention logits of the stored entries.
    """
    _handoff.pending = (layer, keys, scores)


def _claim(keys: torch.Tensor):
    """(layer, wants scores) announced for these keys, or (None, False)."""
    pending = getattr(_handoff, "pending", None)
    if pending is not None and pending[1] is keys:
        _handoff.pending = None
        return pending[0], pending[2]
    return None, False


def _allowed_keys(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """The mask as booleans [b or 1, 1 or heads, q, kv] (True = may attend), or None for no mask."""
    if attention_mask is None:
        if q_len == 1:
            return None
        # transformers passes no mask when causal attention is implied; its alignment is bottom-right
        i = torch.arange(q_len, device=device).unsqueeze(-1)
        j = torch.arange(kv_len, device=device)
        return (j <= i + (kv_len - q_len)).view(1, 1, q_len, kv_len)
    if attention_mask.shape[-1] != kv_len:
        raise ValueError(f"the attention mask covers {attention_mask.shape[-1]} keys but there are {kv_len}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    # additive masks: 0 where allowed, the dtype's min (or -inf) elsewhere
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _grouped_allowed(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, kv_heads: int, groups: int,
                     device) -> torch.Tensor | None:
    """The mask as booleans shaped like grouped logits: [b or 1, kv_heads or 1, groups or 1, q, kv], or None."""
    allowed = _allowed_keys(attention_mask, q_len, kv_len, device)
    if allowed is None:
        return None
    if allowed.shape[1] == 1:
        return allowed.unsqueeze(1)
    return allowed.reshape(allowed.shape[0], kv_heads, groups, q_len, kv_len)


def attention_scores(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None = None) -> torch.Tensor:
    """Scores [b, kv_heads, kv_len] (float32) of docs/design.md#attention-scores for one attention call.

    ``query`` [b, heads, q, d] and ``key`` [b, kv_heads, kv, d] as the attention function gets them
    (GQA groups are contiguous query heads). Computed block by block over the queries so that the
    float32 probabilities never exceed ``SCORE_BLOCK_ELEMENTS`` elements.
    """
    b, num_heads, q_len, d = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = num_heads // kv_heads
    scaling = d ** -0.5 if scaling is None else scaling
    allowed = _grouped_allowed(attention_mask, q_len, kv_len, kv_heads, groups, query.device)
    grouped_q = query.view(b, kv_heads, groups, q_len, d)
    key_t = key.transpose(-1, -2)                                            # [b, kv_heads, d, kv]
    step = max(1, SCORE_BLOCK_ELEMENTS // max(1, b * num_heads * kv_len))
    scores = None
    with torch.no_grad():
        for start in range(0, q_len, step):
            stop = min(q_len, start + step)
            # one plain batched matmul per KV head: the group's queries are its rows
            block_q = grouped_q[:, :, :, start:stop].reshape(b, kv_heads, groups * (stop - start), d)
            logits = torch.matmul(block_q, key_t).float().mul_(scaling)
            logits = logits.view(b, kv_heads, groups, stop - start, kv_len)
            if allowed is None:
                probs = torch.softmax(logits, dim=-1)
            else:
                block = allowed[..., start:stop, :]
                probs = torch.softmax(logits.masked_fill_(~block, float("-inf")), dim=-1)
                probs = probs.masked_fill_(~block.any(-1, keepdim=True), 0.0)  # fully masked queries
            part = probs.sum(dim=(2, 3))
            scores = part if scores is None else scores.add_(part)
    return scores


def biased_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, logit_bias: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention with an additive logit per stored entry: (output [b, q, heads, d], probs, scores).

    ``logit_bias`` [b, kv_heads, stored] covers the first ``stored`` keys (the new ones get 0; None: no
    logit anywhere). Eager
    arithmetic (float32 softmax, masked logits filled, queries that see no key give zeros), so that a
    NaN or padded entry never leaks through an additive mask. ``scores`` are those of ``attention_scores``
    for the biased probabilities.
    """
    b, num_heads, q_len, d = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = num_heads // kv_heads
    scaling = d ** -0.5 if scaling is None else scaling
    grouped_q = query.reshape(b, kv_heads, groups * q_len, d)
    logits = torch.matmul(grouped_q, key.transpose(-1, -2)).float().mul_(scaling)
    if logit_bias is not None:
        logits = logits + torch.nn.functional.pad(logit_bias.float(), (0, kv_len - logit_bias.shape[-1])).unsqueeze(2)
    logits = logits.view(b, kv_heads, groups, q_len, kv_len)
    allowed = _grouped_allowed(attention_mask, q_len, kv_len, kv_heads, groups, query.device)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if allowed is not None:
        probs = probs.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    scores = probs.detach().sum(dim=(2, 3))
    weights = torch.nn.functional.dropout(probs, p=dropout, training=module.training).to(value.dtype)
    output = torch.matmul(weights, value.unsqueeze(2))                       # [b, kv, groups, q, d]
    output = output.reshape(b, num_heads, q_len, d).transpose(1, 2).contiguous()
    return output, probs.reshape(b, num_heads, q_len, kv_len), scores


def last_query_scores(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                      scaling: float | None = None) -> torch.Tensor:
    """``attention_scores`` of the call's last query alone (TOVA's): [b, kv_heads, kv_len], float32.

    The last query sees every key of the call (causal masks are aligned bottom-right), so only
    padding can mask it.
    """
    mask = None if attention_mask is None else attention_mask[..., -1:, :]
    return attention_scores(query[:, :, -1:], key, mask, scaling)


def _with_layer(module, query, key, value, attention_mask, dropout, scaling, plain, plain_scores):
    """The attention of a call: biased when the layer that gave ``key`` has logits, else ``plain``.

    ``plain(mask)`` and ``plain_scores(mask)`` compute the backend's attention and scores under a mask:
    the layer's own (``fit_mask``), since transformers built the one it passes for the first layer.
    """
    layer, wants_scores = _claim(key)
    if hasattr(layer, "fit_mask"):   # a fixed-slot layer: its own mask (per-layer budgets)
        attention_mask = layer.fit_mask(attention_mask, query.shape[2])
        layer.read_by_lococo = True
    last_query = wants_scores and getattr(layer, "scores_from_last_query", False)
    packed = None if layer is None else getattr(layer, "slots_for_attention", None)
    if packed is not None:   # quantized slots, read in blocks beside the appended entries in ``key``
        from .quantized_attention import attention_over_slots

        b, num_heads, q_len, d = query.shape
        kv_heads = key.shape[1]
        allowed = _grouped_allowed(attention_mask, q_len, layer.stored_length, kv_heads, num_heads // kv_heads,
                                   query.device)
        output, scores = attention_over_slots(query, packed, key, value, allowed, getattr(layer, "logit_bias", None),
                                              d ** -0.5 if scaling is None else scaling, wants_scores, last_query)
        layer.slots_for_attention = None
        if wants_scores:
            layer.record_scores(scores)
        return output, None
    if last_query:
        plain_scores = lambda mask: last_query_scores(query, key, mask, scaling)  # noqa: E731
    logit_bias = None if layer is None else getattr(layer, "logit_bias", None)
    if logit_bias is not None:
        output, weights, scores = biased_attention(module, query, key, value, attention_mask, logit_bias,
                                                   dropout, scaling)
        if wants_scores:
            layer.record_scores(plain_scores(attention_mask) if last_query else scores)
        return output, weights
    output, weights = plain(attention_mask)
    if wants_scores:
        layer.record_scores(plain_scores(attention_mask))
    return output, weights


def lococo_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """transformers' SDPA attention, plus the scores for the fixed-slot cache layer that gave ``key``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return _with_layer(
        module, query, key, value, attention_mask, dropout, scaling,
        lambda mask: sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                            scaling=scaling, **kwargs),
        lambda mask: attention_scores(query, key, mask, scaling))


def lococo_eager_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """transformers' eager attention (same operations, same result), scores taken from its probabilities."""
    from transformers.integrations.sdpa_attention import repeat_kv

    kv_len = key.shape[2]
    state = {}

    def plain(mask):
        groups = query.shape[1] // key.shape[1]
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        logits = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)) * scale
        if mask is not None:
            logits = logits + mask
        probs = state["probs"] = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights = torch.nn.functional.dropout(probs.to(query.dtype), p=dropout, training=module.training)
        return torch.matmul(weights, repeat_kv(value, groups)).transpose(1, 2).contiguous(), weights

    def scores_from_probs(mask):
        p = state["probs"].detach()
        if mask is not None:
            live = _allowed_keys(mask, query.shape[2], kv_len, query.device).any(-1, keepdim=True)
            p = p.masked_fill(~live, 0.0)
        b, num_heads, q_len, _ = p.shape
        return p.reshape(b, key.shape[1], num_heads // key.shape[1] * q_len, kv_len).sum(2)

    return _with_layer(module, query, key, value, attention_mask, dropout, scaling, plain, scores_from_probs)


# backend the model used -> scored implementation registered for it
ATTENTION_NAMES = {"sdpa": "lococo_sdpa", "eager": "lococo_eager"}
_FUNCTIONS = {"lococo_sdpa": lococo_sdpa_attention, "lococo_eager": lococo_eager_attention}
# the implementations that give each fixed-slot layer a mask of its own length (per-layer budgets)
FITS_MASKS = tuple(_FUNCTIONS)
_registered = False


def register_attention() -> None:
    """Registers lococo_sdpa and lococo_eager with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    masks = {"lococo_sdpa": sdpa_mask, "lococo_eager": eager_mask}
    for name, function in _FUNCTIONS.items():
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, masks[name])
    _registered = True


def scored_name(implementation: str | None) -> str | None:
    """The scored implementation for a model's attention implementation, None when there is none."""
    if implementation in _FUNCTIONS:
        return implementation
    return ATTENTION_NAMES.get(implementation or "sdpa")
