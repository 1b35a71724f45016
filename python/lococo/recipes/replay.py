"""One layer's fixed-slot cache replayed over the full cache's recorded tensors (layer-local error).

A frozen model runs once with the full cache and every layer's queries, keys, values and attention
output are recorded (``teacher_records``). A cache layer of any kind (``LoCoCoLayer``, ``H2OLayer``, ...)
then replays the layer chunk by chunk, as at inference, and the error of each chunk is

    || (O - O_full) W_o^T ||^2 / || O_full W_o^T ||^2

(O: the chunk's attention outputs, W_o: the layer's output projection), or, given the gradient g of the
document's loss with respect to the layer's attention output (``attention_output_gradients``), the
estimate sum_t (g_t . (O_t - O_full,t) W_o^T)^2 of what the error costs the loss (empirical Fisher,
in loss units, so that layers compare by what they do to the model's predictions). ``lococo distill`` trains on it,
``lococo calibrate`` measures it at several M per layer, ``benchmarks/layer_error.py`` compares caches
with it. Inputs of every layer are the full cache's, so errors do not compound as in a real run.
"""

from __future__ import annotations

from dataclasses import dataclass

CAPTURE = "lococo_capture"
_records: dict[int, tuple] = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _records[module.layer_idx] = (query, key, value, output)
    return output, weights


def register_capture() -> None:
    """Registers the recording attention (sdpa plus a copy of its inputs and output) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE, _capture_attention)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)


def teacher_records(model, ids):
    """{layer: (q [b, heads, T, d], k [b, kv, T, d], v, out [b, T, heads, d])} of a full-cache forward.

    The model's attention implementation must be ``CAPTURE`` (``register_capture`` first).
    """
    import torch

    _records.clear()
    with torch.no_grad():
        model.model(input_ids=ids, use_cache=False)
    records = dict(_records)
    _records.clear()
    return records


def attention_output_gradients(model, ids, block_size: int = 1024) -> dict:
    """{layer: g [b, T, hidden] float32}, g the gradient of the summed next-token NLL of ``ids`` [b, T] with respect to
    the layer's attention output (the self-attention module's output, after the output projection), from one
    full-cache forward and backward. The logits are computed ``block_size`` positions at a time and recomputed in
    the backward pass, so that a large vocabulary never holds [T, vocab] logits with their gradients."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    outputs: dict[int, torch.Tensor] = {}

    def keep(index, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out.retain_grad()
        outputs[index] = out

    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: keep(i, m, a, o))
             for i, layer in enumerate(model.model.layers)]
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)

    def block_nll(hidden, targets):
        logits = head(hidden).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)   # the activations' gradients only
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            hidden = model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            total = ids.shape[1] - 1
            loss = sum(checkpoint(block_nll, hidden[:, start:min(total, start + block_size)],
                                  ids[:, start + 1:min(total, start + block_size) + 1], use_reentrant=False)
                       for start in range(0, total, block_size))
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)
    return {index: out.grad.detach().float() for index, out in outputs.items()}


@dataclass
class ReplayError:
    """The summed error of the chunks a replay compressed, how many they were, and all its chunks."""

    error_sum: float = 0.0
    compressed_chunks: int = 0
    chunks: int = 0

    @property
    def per_chunk(self) -> float:
        """Mean error over every chunk (those before the first compression count 0: nothing was lost)."""
        return self.error_sum / max(1, self.chunks)


def replay(layer, record, attention_module, chunk_size: int, *, lookahead: bool = False, step_every: int = 0,
           on_update=None, scale=None, gradient=None) -> ReplayError:
    """``layer`` (a fresh fixed-slot cache layer) over one recorded layer, chunk by chunk, as at inference.

    The attention is ``biased_attention`` (which the scored attention functions use too), so that
    training sees exactly what generation will; a layer that ranks by the last query (TOVA) gets those
    scores. With ``step_every`` > 0 the loss is back-propagated after every compressed chunk and
    ``on_update()`` is called every ``step_every`` of them (and once at the end). ``lookahead``
    compresses with the scores that the coming chunk's own queries give the stored entries instead of
    the previous chunk's: an oracle no cache can run, the best a one-chunk selection can do.
    ``scale`` [b, T] (a squared norm per token, e.g. of the residual stream) replaces the reference's
    squared norm in each chunk's denominator. ``gradient`` [b, T, hidden] (``attention_output_gradients``) makes
    each chunk's error the loss estimate sum_t (g_t . error_t)^2 instead of a relative error.
    """
    import torch

    from ..hf.attention import biased_attention, last_query_scores

    query, key, value, target = (t.float() for t in record)
    b, heads, total, d = query.shape
    w_o = attention_module.o_proj.weight.float()
    target = target.reshape(b, total, heads * d)
    scaling = attention_module.scaling
    last_query = getattr(layer, "scores_from_last_query", False)
    result, pending = ReplayError(), 0
    train = step_every > 0
    for start in range(0, total, chunk_size):
        stop = min(total, start + chunk_size)
        q, new_keys, new_values = query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop]
        if lookahead and layer._will_compress():
            with torch.no_grad():
                keys, values = torch.cat([layer.keys, new_keys], -2), torch.cat([layer.values, new_values], -2)
                if last_query:
                    ahead = last_query_scores(q, keys, None, scaling)
                else:
                    ahead = biased_attention(attention_module, q, keys, values, None, layer.logit_bias,
                                             scaling=scaling)[2]
            layer.record_scores(ahead[..., :layer.stored_length])
        with torch.set_grad_enabled(train and layer._will_compress()):
            keys, values = layer.update(new_keys, new_values)
            # no mask: every stored entry visible, the new ones causal (bottom-right aligned)
            out, _, scores = biased_attention(attention_module, q, keys, values, None, layer.logit_bias,
                                              scaling=scaling)
            layer.record_scores(last_query_scores(q, keys, None, scaling) if last_query else scores)
            result.chunks += 1
            if layer.num_compressions:
                reference = target[:, start:stop] @ w_o.T
                out = out.reshape(b, stop - start, heads * d) @ w_o.T
                if gradient is not None:
                    error = ((out - reference) * gradient[:, start:stop]).sum(-1).pow(2).sum()
                else:
                    norm = reference.pow(2).sum() if scale is None else scale[:, start:stop].sum()
                    error = (out - reference).pow(2).sum() / norm.clamp_min(1e-12)
                if train and error.requires_grad:
                    error.backward()
                    pending += 1
                    if pending == step_every:
                        on_update()
                        pending = 0
                result.error_sum += float(error.detach())
                result.compressed_chunks += 1
        layer.detach_()
    if train and pending:
        on_update()
    return result
