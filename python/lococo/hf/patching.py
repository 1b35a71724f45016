"""``apply_lococo(model, compressor)``: one call that puts a fixed-slot cache under a model.

What it changes on the model instance (``remove_lococo`` undoes all of it):
- the attention implementation: ``sdpa`` -> ``lococo_sdpa``, ``eager`` -> ``lococo_eager``, which
  also produce the scores the compression needs (not changed in pure-convolution mode, which
  needs none and runs on any backend);
- a forward pre-hook on the decoder that tells a fixed-slot cache which new tokens are padding,
  and that gives plain forwards a ``LoCoCoCache`` when they would otherwise build a DynamicCache;
- ``model.generate``: an instance attribute that passes a fresh ``LoCoCoCache`` when the caller
  gives no cache (``cache=`` in transformers 5.24, ``past_key_values=`` before), also for
  ``cache_implementation="lococo"``; another ``cache_implementation`` (which would build transformers'
  own cache and silently drop LoCoCo) is refused.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

from torch import nn

from ..compressor import LoCoCoCompressor
from . import attention
from .caches import FixedSlotCache, LoCoCoCache
from .compat import cache_kwarg

__all__ = ["SUPPORTED_MODEL_TYPES", "apply_lococo", "is_patched", "remove_lococo"]


@dataclass(frozen=True)
class ModelSupport:
    """How lococo finds its way in one architecture family."""

    decoder_attr: str = "model"     # the attribute of the *ForCausalLM holding the decoder
    sliding_window_attr: str | None = None  # a config field that, when set, windows every layer


# model_type -> support entry. Decoders with RoPE, GQA, one cache layer per decoder layer and attention through
# transformers' AttentionInterface. SmolLM2 is "llama". Full-attention layers get fixed slots; in a model that mixes
# them with sliding-window layers (Gemma 3, Qwen2/3 with use_sliding_window) those keep transformers' window cache.
SUPPORTED_MODEL_TYPES: dict[str, ModelSupport] = {
    "llama": ModelSupport(),
    "mistral": ModelSupport(sliding_window_attr="sliding_window"),
    "qwen2": ModelSupport(sliding_window_attr="sliding_window"),
    "qwen3": ModelSupport(sliding_window_attr="sliding_window"),
    "gemma3_text": ModelSupport(),
}

_STATE_ATTR = "_lococo_state"


@dataclass
class _PatchState:
    compressor: LoCoCoCompressor | None
    original_attn: str
    cache_kwarg: str
    hooks: list = field(default_factory=list)


def _support_for(model) -> ModelSupport:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"lococo does not support model_type {model_type!r} ({type(model).__name__}); supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}. Other Llama-family decoders may work: add them to "
            "lococo.hf.patching.SUPPORTED_MODEL_TYPES after checking that they use AttentionInterface and one "
            "full-attention cache layer per decoder layer.")
    return SUPPORTED_MODEL_TYPES[model_type]


def _check_layers(model, support: ModelSupport, compressor: LoCoCoCompressor | None) -> None:
    config = model.config
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if other:
        raise NotImplementedError(
            f"{config.model_type}: layers of types {other}; lococo compresses full-attention layers and leaves "
            "sliding-window layers to transformers' window cache, and knows no other kind")
    if support.sliding_window_attr and compressor is not None and "full_attention" not in layer_types:
        window = getattr(config, support.sliding_window_attr, None)
        cfg = compressor.config
        if window is not None and window <= cfg.max_slots + cfg.beta:
            raise ValueError(
                f"{config.model_type} attends within a sliding window of {window} tokens, which must exceed "
                f"M + beta = {cfg.max_slots + cfg.beta} (the largest M of any layer) so that every slot stays "
                "visible")


def _decoder(model, support: ModelSupport) -> nn.Module:
    decoder = getattr(model, support.decoder_attr, None)
    if not isinstance(decoder, nn.Module):
        raise NotImplementedError(f"{type(model).__name__} has no decoder module at .{support.decoder_attr}; "
                                  "pass the *ForCausalLM model")
    return decoder


# Positions of the decoder's forward arguments (input_ids, attention_mask, position_ids, cache, ...)
_ARG_POSITION = {"input_ids": 0, "attention_mask": 1, "cache": 3}


def _argument(args, kwargs, name: str, kwarg: str | None = None):
    kwarg = kwarg or name
    if kwarg in kwargs:
        return kwargs[kwarg]
    position = _ARG_POSITION[name]
    return args[position] if len(args) > position else None


def _query_length(args, kwargs) -> int:
    ids = _argument(args, kwargs, "input_ids")
    if ids is not None:
        return ids.shape[-1]
    embeds = kwargs.get("inputs_embeds")
    return 0 if embeds is None else embeds.shape[1]


def _before_forward(model, state: _PatchState, module, args, kwargs):
    cache = _argument(args, kwargs, "cache", state.cache_kwarg)
    if cache is None and len(args) <= _ARG_POSITION["cache"] and state.compressor is not None:
        use_cache = kwargs.get("use_cache")
        use_cache = module.config.use_cache if use_cache is None else use_cache
        if use_cache and not (module.training and getattr(module, "gradient_checkpointing", False)):
            cache = LoCoCoCache(state.compressor)
            kwargs[state.cache_kwarg] = cache
    if isinstance(cache, FixedSlotCache):
        if cache.get_seq_length() == 0:   # its first forward: a cache built for another model fails here
            cache.check_model(model)
        if len({m for m in cache.num_slots if m is not None}) > 1 and \
                model.config._attn_implementation not in attention.FITS_MASKS:
            raise ValueError(
                f"this cache has per-layer budgets, which need the lococo attention (it fits each layer's mask), but "
                f"the model runs {model.config._attn_implementation!r}: call lococo.apply_lococo(model) without a "
                "pure-convolution compressor, or model.set_attn_implementation('lococo_sdpa')")
        cache.set_input_padding(_argument(args, kwargs, "attention_mask"), _query_length(args, kwargs))
    return args, kwargs


def _after_forward(state: _PatchState, module, args, kwargs, output):
    cache = _argument(args, kwargs, "cache", state.cache_kwarg)
    if isinstance(cache, FixedSlotCache):
        cache.set_input_padding(None, 0)
    return output


def _generate(model, *args, **kwargs):
    state: _PatchState = getattr(model, _STATE_ATTR)
    if state.cache_kwarg == "cache" and "past_key_values" in kwargs:
        # transformers would warn from inside this wrapper; rename here and warn at the caller's line
        old = kwargs.pop("past_key_values")
        if "cache" in kwargs:
            warnings.warn(f"Both `past_key_values` and `cache` are set for `{type(model).__name__}.generate`; "
                          "using `cache` and ignoring the deprecated `past_key_values`", FutureWarning, stacklevel=2)
        else:
            warnings.warn(f"`past_key_values` is deprecated for `{type(model).__name__}.generate` in this "
                          "transformers version. Use `cache` instead.", FutureWarning, stacklevel=2)
            kwargs["cache"] = old
    gen_config = kwargs.get("generation_config") or model.generation_config
    wants_cache = kwargs.get("use_cache", getattr(gen_config, "use_cache", True)) is not False
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    implementation = kwargs.get("cache_implementation", getattr(gen_config, "cache_implementation", None))
    if implementation == "lococo":   # transformers does not know the name: the patch gives the cache itself
        if state.compressor is None:
            raise ValueError("generate(cache_implementation='lococo') needs a compressor: "
                             "lococo.apply_lococo(model, compressor)")
        kwargs["cache_implementation"] = implementation = None
    elif implementation is not None and cache is None and state.compressor is not None and wants_cache:
        raise ValueError(
            f"generate(cache_implementation={implementation!r}) would build transformers' own cache and run without "
            "LoCoCo on a model that lococo.apply_lococo patched: leave cache_implementation unset (or 'lococo'), pass "
            "cache= explicitly, or lococo.remove_lococo(model) first"
            + (" (it comes from model.generation_config)" if "cache_implementation" not in kwargs else ""))
    default_cache = implementation is None
    if cache is None and state.compressor is not None and wants_cache and default_cache:
        cache = kwargs[state.cache_kwarg] = LoCoCoCache(state.compressor)
    chunk = _prefill_chunk(cache, state.compressor)
    if chunk is not None and kwargs.get("prefill_chunk_size", getattr(gen_config, "prefill_chunk_size", None)) is None:
        kwargs["prefill_chunk_size"] = chunk
    return type(model).generate(model, *args, **kwargs)


def _prefill_chunk(cache, compressor: LoCoCoCompressor | None) -> int | None:
    """B, the chunk a fixed-slot cache reads a prompt in: the cache's compressor's, else the patch's.

    A prompt read in one forward would be compressed in one step from attention summed over the whole
    prompt, and its scores would cost the whole prompt-by-prompt attention; chunks of B keep the
    attention of every call within M + beta + B keys, as in training.
    """
    if not isinstance(cache, FixedSlotCache):
        return None
    if isinstance(cache, LoCoCoCache):
        return cache.config.chunk_size
    return None if compressor is None else compressor.config.chunk_size


def apply_lococo(model: nn.Module, compressor: LoCoCoCompressor | None = None) -> nn.Module:
    """Makes ``model`` run with a fixed-slot cache through the normal transformers API.

    With a ``compressor``, ``model.generate(...)`` and plain forwards that would build a
    DynamicCache get a fresh ``LoCoCoCache(compressor)`` instead; a cache passed explicitly
    (``cache=``/``past_key_values=``) is used as given. ``generate()`` with a fixed-slot cache reads
    the prompt in chunks of the compressor's B (``config.chunk_size``) unless ``prefill_chunk_size``
    is given: the quality and the memory of a chunked prefill, by default. Without one, the model is only prepared
    for fixed-slot caches passed explicitly (``H2OCache``, ``TOVACache``, ``StreamingLLMCache``,
    ``LoCoCoCache``).

    The attention implementation becomes ``lococo_sdpa`` or ``lococo_eager`` unless the compressor
    is pure convolution (rho = 1, alpha = 1), which needs no scores. Flash/flex attention is replaced
    by ``lococo_sdpa`` with a warning when scores are needed. Calling it again replaces the previous
    patch. Returns the model.
    """
    support = _support_for(model)
    if compressor is not None:
        if not isinstance(compressor, LoCoCoCompressor):
            raise TypeError(f"compressor must be a LoCoCoCompressor, got {type(compressor).__name__}")
        compressor.check_model(model)
    _check_layers(model, support, compressor)
    decoder = _decoder(model, support)
    if getattr(model, _STATE_ATTR, None) is not None:
        remove_lococo(model)

    current = original = model.config._attn_implementation
    # per-layer budgets need the lococo attention too: it fits each layer's mask to its own length
    needs_scores = compressor is None or compressor.needs_scores() or compressor.config.per_layer
    if needs_scores:
        attention.register_attention()
        target = attention.scored_name(current)
        if target is None:
            warnings.warn(f"attention implementation {current!r} produces no attention scores; lococo switches "
                          "the model to 'lococo_sdpa'", stacklevel=2)
            target = "lococo_sdpa"
        if target != current:
            model.set_attn_implementation(target)
    if compressor is not None:
        device = next(model.parameters()).device
        if any(p.device != device for p in compressor.parameters()):
            compressor.to(device)

    state = _PatchState(compressor=compressor, original_attn=original, cache_kwarg=cache_kwarg(model))
    state.hooks.append(decoder.register_forward_pre_hook(
        functools.partial(_before_forward, model, state), with_kwargs=True))
    state.hooks.append(decoder.register_forward_hook(functools.partial(_after_forward, state), with_kwargs=True))
    setattr(model, _STATE_ATTR, state)
    model.generate = functools.partial(_generate, model)
    return model


def remove_lococo(model: nn.Module) -> nn.Module:
    """Undoes ``apply_lococo``: the original attention implementation, no hooks, the class's generate."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for hook in state.hooks:
        hook.remove()
    if model.config._attn_implementation != state.original_attn:
        model.set_attn_implementation(state.original_attn)
    model.__dict__.pop("generate", None)
    delattr(model, _STATE_ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    """True when ``apply_lococo`` was applied to this model and not removed."""
    return getattr(model, _STATE_ATTR, None) is not None
