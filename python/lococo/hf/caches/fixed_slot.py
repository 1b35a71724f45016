"""Fixed-slot KV caches for transformers: the common layer logic and the LoCoCo cache.

A fixed-slot layer follows docs/design.md#compression-trigger. At the start of ``update`` it compresses its stored
entries to M slots when it stores more than M + beta of them, using the scores of the previous
attention call; then it appends the new entries and returns [stored ; new]. Keys stay post-RoPE
at their absolute positions; ``get_seq_length()`` counts the tokens seen.

Padding: each row keeps its valid entries right-aligned (a suffix of the stored axis), counted by
``valid_len``. A row then holds min(valid tokens seen, stored) valid entries, which is exactly
what transformers' own 2D padding mask says about the last ``stored`` columns before the new
ones, given ``get_mask_sizes`` = (stored + q, seen - stored). So the standard masks (any backend)
see every slot, the new entries causally, and no pad. Left padding only.

Storage (docs/design.md#quantized-slots): every layer holds its entries in a storage component
(``storage.py``), in the model's dtype or with the compressed slots in 8 or 4 bits, whatever it compresses
with. ``keys``/``values`` are the entries held in the model's dtype; ``entries()`` gives all of them.

The trigger is per layer (docs/design.md#left-padding): the stored length counts a row's padding, so a padded row
is compressed on its batch's schedule. Its outputs equal those of the same row run alone with the
same padding (the pads themselves never matter), and, until the first compression, those of the
row run alone without padding.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from ...compressor import LayerCompressor, LoCoCoCompressor
from ...config import LoCoCoConfig
from .. import attention
from .storage import FloatStorage, make_storage, tensor_bytes

__all__ = ["FixedSlotCache", "FixedSlotLayer", "LoCoCoCache", "LoCoCoLayer", "kv_bytes"]


def layer_kv_bytes(layer) -> int:
    """Bytes of the keys and values stored by one layer of a transformers cache of any kind.

    A fixed-slot layer's storage counts itself (quantized slots: their codes and scales).
    """
    if not getattr(layer, "is_initialized", True):
        return 0
    storage = getattr(layer, "storage", None)
    if isinstance(storage, FloatStorage):
        return storage.nbytes()
    return tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None))


def layer_stored_length(layer) -> int:
    """Entries one layer of a transformers cache of any kind stores (a fixed-slot layer: slots and appended
    entries; a window layer: those in its window)."""
    if isinstance(layer, FixedSlotLayer):
        return layer.stored_length
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or not getattr(layer, "is_initialized", True) else keys.shape[-2]


def kv_bytes(cache) -> int:
    """Bytes of the keys and values stored by every layer of a transformers cache of any kind."""
    return sum(layer_kv_bytes(layer) for layer in cache.layers)


class FixedSlotLayer(DynamicLayer):
    """One decoder layer of a fixed-slot cache; subclasses define ``compress``."""

    is_compileable = False  # shapes change at every compression
    is_croppable = False    # fused slots cannot be un-merged
    is_sliding = False
    needs_scores = True

    def __init__(self, num_slots: int, beta: int, quantization=None):
        """``quantization``: how the compressed slots are stored: None or 16 (the model's dtype), 8, 4 or a
        ``lococo.SlotQuantization``."""
        self.storage = make_storage(quantization)   # before the base class sets keys and values
        super().__init__()
        if num_slots < 1 or beta < 0:
            raise ValueError(f"num_slots must be >= 1 and beta >= 0, got {num_slots} and {beta}")
        self.num_slots, self.beta = num_slots, beta
        self.cumulative_length = 0        # tokens seen
        self.valid_len: torch.Tensor | None = None   # int64 [b]: valid entries at the end of each row
        self.scores: torch.Tensor | None = None      # float32 [b, kv_heads, stored], latest call only
        # float32 [b, kv_heads, stored]: an attention logit per stored entry, or None for none at all
        self.logit_bias: torch.Tensor | None = None
        self.num_compressions = 0
        # int64 [b]: valid entries among those stored before the latest call's new ones (fit_mask)
        self.stored_valid: torch.Tensor | None = None
        # quantized slots: the lococo attention read the latest call (then it may read the slots in blocks), and
        # the packed slots this call's attention reads beside the appended entries it gets (None: it gets all)
        self.read_by_lococo = False
        self.slots_for_attention = None

    # --- storage --------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        """The keys held in the model's dtype: all of them, or those appended since the slots were quantized."""
        return self.storage.keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self.storage.keys = value

    @property
    def values(self) -> torch.Tensor | None:
        """The values held in the model's dtype (as ``keys``)."""
        return self.storage.values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self.storage.values = value

    @property
    def quantization(self):
        """The ``lococo.SlotQuantization`` of the compressed slots, or None (the model's dtype)."""
        return self.storage.quantization

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored entry's key and value [b, h, stored, d] in the model's dtype, slots first."""
        return self.storage.entries()

    # --- what subclasses implement -------------------------------------------------------------
    def compress(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [b, h, M, d] from the stored entries (``entries()``), valid rows right-aligned."""
        raise NotImplementedError

    def slot_logits(self, fused_rows: torch.Tensor) -> torch.Tensor | None:
        """The attention logits [b, h, M] of the slots ``compress`` just made, or None for no logits.

        ``fused_rows`` [b] bool: the rows that had at least M valid entries (the others kept theirs).
        """
        return None

    # --- bookkeeping ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b = key_states.shape[0]
        self.device, self.dtype = key_states.device, key_states.dtype
        self.storage.start(key_states, value_states)
        self.valid_len = torch.zeros(b, dtype=torch.long, device=self.device)
        self.is_initialized = True

    @property
    def stored_length(self) -> int:
        return 0 if not self.is_initialized else self.storage.length

    def _will_compress(self) -> bool:
        return self.stored_length > self.num_slots + self.beta

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               new_valid: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress if due, append, return [stored ; new] for this call's attention.

        ``new_valid`` (int64 [b]): how many of the new entries of each row are not padding (their
        last ones); all of them when None.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._will_compress():
            fused_rows = self.valid_len >= self.num_slots
            self.storage.replace(*self.compress())
            self.logit_bias = self.slot_logits(fused_rows)
            self.valid_len = self.valid_len.clamp(max=self.num_slots)
            self.num_compressions += 1
        self.scores = None
        self.stored_valid = self.valid_len
        self.storage.append(key_states, value_states)
        # The lococo attention reads packed slots in blocks (quantized_attention.py): it then gets only the
        # entries appended since, and no full-precision copy of the slots is made. Any other reader (an
        # attention that did not claim the previous call, distill's replay) gets every entry dequantized.
        packed, claimed = self.storage.packed_slots(), self.read_by_lococo
        self.read_by_lococo = False
        self.slots_for_attention = packed if claimed else None
        keys, values = (self.keys, self.values) if self.slots_for_attention is not None else self.entries()
        if self.logit_bias is not None:  # new entries: no logit
            self.logit_bias = torch.nn.functional.pad(self.logit_bias, (0, key_states.shape[-2]))
        added = key_states.shape[-2] if new_valid is None else new_valid
        self.valid_len = (self.valid_len + added).clamp(max=self.stored_length)
        self.cumulative_length += key_states.shape[-2]
        # only the call before a compression needs scores (they are never accumulated): in decoding
        # that is one step in beta + 1, and the others skip the extra attention pass
        wants_scores = self.needs_scores and self._will_compress()
        # always announced: with per-layer budgets the mask transformers built fits another layer's length
        attention.expect_scores(self, keys, scores=wants_scores)
        return keys, values

    def fit_mask(self, attention_mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
        """The attention mask of this layer's latest call, from the one transformers built for another layer.

        transformers builds one mask per forward from the first layer's ``get_mask_sizes``; with per-layer
        budgets this layer may store another number of entries (docs/design.md#per-layer-budgets). The new
        entries' columns (the last ``query_length``: causal, with their padding) are the same in every
        layer; the stored columns are this layer's valid suffix, visible to every query. Returns the mask
        unchanged when it already fits, and a mask of the same kind (boolean or additive) otherwise.
        """
        kv_len = self.stored_length
        stored = kv_len - query_length
        if attention_mask is not None and attention_mask.shape[-1] == kv_len:
            return attention_mask
        if attention_mask is None:
            # transformers saw no padding in the first layer's columns (the new tokens among them), but this
            # layer's stored entries may reach further back, into a row's padding
            if stored == 0 or (query_length == 1 and bool((self.stored_valid == stored).all())):
                return attention_mask
            i = torch.arange(query_length, device=self.device).unsqueeze(-1)
            causal = torch.arange(query_length, device=self.device) <= i
            new = torch.zeros(causal.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~causal, torch.finfo(self.dtype).min).view(1, 1, query_length, query_length)
        elif attention_mask.shape[-1] < query_length:
            raise ValueError(f"the attention mask covers {attention_mask.shape[-1]} keys, fewer than the "
                             f"{query_length} new ones")
        else:
            new = attention_mask[..., -query_length:]
        b = max(new.shape[0], self.stored_valid.shape[0])
        seen = torch.arange(stored, device=self.device) >= (stored - self.stored_valid).unsqueeze(-1)  # [b, stored]
        seen = seen.view(-1, 1, 1, stored).expand(b, new.shape[1], query_length, stored)
        if new.dtype == torch.bool:
            old = seen
        else:
            old = torch.zeros(seen.shape, dtype=new.dtype, device=new.device).masked_fill_(
                ~seen, torch.finfo(new.dtype).min)
        return torch.cat([old, new.expand(b, -1, -1, -1)], dim=-1)

    def record_scores(self, scores: torch.Tensor) -> None:
        """Called by the lococo attention functions with the scores [b, kv_heads, stored]."""
        stored = (*self.valid_len.shape, self.keys.shape[1], self.stored_length)
        if tuple(scores.shape) != stored:
            raise RuntimeError(f"attention scores of shape {tuple(scores.shape)} do not match the "
                               f"{stored} stored entries")
        self.scores = scores.detach().float()

    def _scores_for_compression(self) -> torch.Tensor:
        if self.scores is None:
            raise RuntimeError(
                f"{type(self).__name__}: {self.stored_length} entries must be compressed but the last attention "
                "call left no scores. The model's attention implementation does not produce them: call "
                "lococo.apply_lococo(model, ...) first (it switches sdpa/eager to lococo_sdpa/lococo_eager), "
                "or use a mode that needs no scores (pure convolution, StreamingLLM).")
        return self.scores

    def _valid_mask(self) -> torch.Tensor:
        """[b, stored] bool: True on each row's valid suffix."""
        stored = self.stored_length
        return torch.arange(stored, device=self.device) >= (stored - self.valid_len).unsqueeze(-1)

    def get_seq_length(self) -> int:
        """Tokens seen (positions keep counting them), not the number of stored entries."""
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(stored + q, seen - stored) as ``update`` will see them, compression included."""
        stored = self.num_slots if self._will_compress() else self.stored_length
        return stored + query_length, self.cumulative_length - stored

    def get_max_length(self) -> int:
        return -1  # any number of tokens; the stored entries stay under M + beta + q

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise ValueError(f"{type(self).__name__} cannot be cropped (asked to crop {tokens_to_remove}): compressed "
                         "slots cannot be un-merged. Assisted/speculative decoding and other features that roll "
                         "the cache back are not supported with fixed-slot caches.")

    def reset(self) -> None:
        self.storage.clear()
        self.is_initialized = False
        self.cumulative_length = 0
        self.valid_len = None
        self.scores = None
        self.logit_bias = None
        self.num_compressions = 0
        self.stored_valid = None
        self.read_by_lococo = False
        self.slots_for_attention = None

    def _map_rows(self, fn) -> None:
        if not self.is_initialized:
            return
        self.storage.map_rows(fn)
        self.valid_len = fn(self.valid_len)
        if self.stored_valid is not None:
            self.stored_valid = fn(self.stored_valid)
        if self.scores is not None:
            self.scores = fn(self.scores)
        if self.logit_bias is not None:
            self.logit_bias = fn(self.logit_bias)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices, ...])

    def detach_(self) -> None:
        """Cuts the autograd history of the stored entries (truncated backprop between chunks)."""
        if self.is_initialized:
            self.storage.detach_()
        if self.logit_bias is not None:
            self.logit_bias = self.logit_bias.detach()

    def nbytes(self) -> int:
        """Bytes held by this layer: stored keys and values (``layer_kv_bytes``), scores, row counters, slot logits."""
        bookkeeping = tensor_bytes(self.scores, self.valid_len, self.logit_bias) if self.is_initialized else 0
        return layer_kv_bytes(self) + bookkeeping


class FixedSlotCache(Cache):
    """A transformers ``Cache`` made of fixed-slot layers, one per decoder layer.

    In a model that mixes sliding-window and full-attention layers (Gemma 3), each sliding-window layer keeps
    transformers' own ``DynamicSlidingWindowLayer`` and only the full-attention layers are fixed-slot layers
    (``keep_windows``; docs/design.md#sliding-window-layers).

    ``lococo.apply_lococo`` tells it, before each forward, which new tokens are padding
    (``set_input_padding``); without that every new token counts as valid.
    """

    def __init__(self, layers: list[FixedSlotLayer], num_kv_heads: int | None = None):
        """``num_kv_heads`` (when known): the model's KV heads, checked at each layer's first update."""
        if not layers:
            raise ValueError("a fixed-slot cache needs at least one layer")
        super().__init__(layers=layers)
        self.num_kv_heads = num_kv_heads
        self.windowed_layers: tuple[int, ...] = ()   # the layers left to transformers' window cache
        self._new_valid: tuple[int, torch.Tensor] | None = None   # (tokens fed, valid ones per row)
        self._last_layer: int | None = None   # the layer the latest update stored

    def keep_windows(self, geometry) -> FixedSlotCache:
        """Gives each sliding-window layer of a mixed model (``geometry.windowed_layers``, a ``ModelGeometry``)
        transformers' own window cache layer instead of a fixed-slot one; returns the cache.

        ``lococo.build_cache`` and ``LoCoCoCache`` do this for the model they are built for.
        """
        if len(geometry.windowed_layers) and geometry.num_layers != len(self.layers):
            raise ValueError(f"{type(self).__name__} has {len(self.layers)} layers, the model {geometry.num_layers}")
        for i in geometry.windowed_layers:
            self.layers[i] = DynamicSlidingWindowLayer(sliding_window=geometry.sliding_window)
        self.windowed_layers = tuple(geometry.windowed_layers)
        return self

    @property
    def fixed_layers(self) -> list[FixedSlotLayer]:
        """The fixed-slot layers (every layer but the sliding-window layers of a mixed model)."""
        return [layer for layer in self.layers if isinstance(layer, FixedSlotLayer)]

    def check_model(self, model_or_config) -> None:
        """Raises ValueError when the model has another number of decoder layers than this cache."""
        from ...compressor import ModelGeometry

        theirs = ModelGeometry.of(model_or_config)
        if theirs.num_layers != len(self.layers):
            raise ValueError(f"{type(self).__name__} has {len(self.layers)} layers, the model "
                             f"({theirs.model_type}) {theirs.num_layers}: build the cache for this model")
        if tuple(theirs.windowed_layers) != self.windowed_layers:
            raise ValueError(
                f"the model ({theirs.model_type}) has sliding-window layers {list(theirs.windowed_layers)}, which keep "
                f"transformers' window cache, but this {type(self).__name__} has them at {list(self.windowed_layers)}: "
                "build the cache with lococo.build_cache(kind, model), which knows the model's layer types")
        if self.num_kv_heads is not None and theirs.num_kv_heads != self.num_kv_heads:
            raise ValueError(f"{type(self).__name__} was built for {self.num_kv_heads} KV heads, the model "
                             f"({theirs.model_type}) has {theirs.num_kv_heads}: build the cache for this model")

    def set_input_padding(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        """Reads the new tokens' padding from the 2D attention mask of the coming forward.

        ``attention_mask`` [b, seen + q] (1 = token, 0 = left padding) or None (no padding).
        """
        if attention_mask is None or attention_mask.dim() != 2 or query_length == 0:
            self._new_valid = None
        else:
            valid = (attention_mask[:, -query_length:] != 0).sum(-1).to(torch.long)
            self._new_valid = (query_length, valid)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"{type(self).__name__} has {len(self.layers)} layers (it was built for a "
                             f"{len(self.layers)}-layer model) but was asked to store layer {layer_idx}: the model "
                             "has more decoder layers; build the cache for this model")
        if layer_idx == 0 and self._last_layer is not None and self._last_layer != len(self.layers) - 1:
            raise ValueError(f"{type(self).__name__} has {len(self.layers)} layers but the model's forward stored "
                             f"only {self._last_layer + 1}: the model has fewer decoder layers; build the cache for "
                             "this model")
        self._last_layer = layer_idx
        if self.num_kv_heads is not None and key_states.shape[1] != self.num_kv_heads:
            raise ValueError(f"{type(self).__name__} was built for {self.num_kv_heads} KV heads, but layer {layer_idx} "
                             f"stores keys with {key_states.shape[1]}: build the cache for this model")
        new_valid = None
        if self._new_valid is not None and self._new_valid[0] == key_states.shape[-2]:
            new_valid = self._new_valid[1]
            if new_valid.shape[0] != key_states.shape[0]:
                raise ValueError(f"the attention mask has {new_valid.shape[0]} rows but the keys have "
                                 f"{key_states.shape[0]}")
        return self.layers[layer_idx].update(key_states, value_states, new_valid=new_valid)

    def detach_(self) -> None:
        """Cuts the autograd history of every layer (call between training chunks)."""
        for layer in self.layers:
            if isinstance(layer, FixedSlotLayer):
                layer.detach_()
            elif getattr(layer, "is_initialized", False):
                layer.keys, layer.values = layer.keys.detach(), layer.values.detach()

    def nbytes(self) -> int:
        """Bytes held by all layers: stored keys and values (``kv_bytes``), scores and row counters."""
        return sum(layer.nbytes() if isinstance(layer, FixedSlotLayer) else layer_kv_bytes(layer)
                   for layer in self.layers)

    def compressed_kv_bytes(self) -> int:
        """Bytes of the keys and values held by the fixed-slot layers alone (``kv_bytes`` counts every layer)."""
        return sum(layer_kv_bytes(layer) for layer in self.fixed_layers)

    @property
    def stored_lengths(self) -> list[int]:
        """Entries each layer stores (a sliding-window layer: those in its window)."""
        return [layer_stored_length(layer) for layer in self.layers]

    @property
    def num_compressions(self) -> int:
        """The most compressions any layer has made (``compressions_per_layer`` has each layer's)."""
        return max(m for m in self.compressions_per_layer if m is not None)

    @property
    def compressions_per_layer(self) -> list[int | None]:
        """Compressions each layer has made (None for a sliding-window layer): with per-layer budgets, layers
        compress at their own times."""
        return [layer.num_compressions if isinstance(layer, FixedSlotLayer) else None for layer in self.layers]

    @property
    def num_slots(self) -> list[int | None]:
        """M of each layer (None for a sliding-window layer, which keeps transformers' window)."""
        return [layer.num_slots if isinstance(layer, FixedSlotLayer) else None for layer in self.layers]


class LoCoCoLayer(FixedSlotLayer):
    """A layer compressed by its ``LayerCompressor`` (``lococo.fuse_kv``)."""

    def __init__(self, compressor: LayerCompressor, config: LoCoCoConfig, needs_scores: bool = True,
                 quantization=None):
        """``quantization``: the slots' storage (as ``FixedSlotLayer``); default: the config's."""
        if config.per_layer:
            raise ValueError("LoCoCoLayer takes one layer's config: config.layer(i) of per-layer budgets")
        super().__init__(config.num_slots, config.beta,
                         config.quantization if quantization is None else quantization)
        if compressor.num_fused != config.num_fused:
            raise ValueError(f"the layer compressor fuses {compressor.num_fused} slots, the config "
                             f"{config.num_fused}")
        self.compressor = compressor
        self.num_heavy, self.num_local = config.num_heavy, config.num_local
        self.needs_scores = needs_scores

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[-1] != self.compressor.head_dim or value_states.shape[-1] != self.compressor.head_dim:
            raise ValueError(f"the model's keys and values have head_dim {key_states.shape[-1]} and "
                             f"{value_states.shape[-1]}, this layer's compressor was built for head_dim "
                             f"{self.compressor.head_dim}: build the compressor for this model")
        super().lazy_initialization(key_states, value_states)

    def compress(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.entries()
        if self.needs_scores:
            scores = self._scores_for_compression()
        else:  # pure convolution: every slot is fused with weight 1, no entry is picked by score
            scores = keys.new_zeros(keys.shape[:3], dtype=torch.float32)
        empty_k, empty_v = keys[:, :, :0], values[:, :, :0]
        return self.compressor(keys, values, empty_k, empty_v, scores, self.num_heavy,
                               self.num_local, self.valid_len)

    def slot_logits(self, fused_rows: torch.Tensor) -> torch.Tensor | None:
        """The compressor's logit on each fused slot of a fused row; 0 on heavy hitters and kept rows."""
        learned = getattr(self.compressor, "slot_logit", None)
        if learned is None:
            return None
        b, h = self.keys.shape[:2]
        logits = learned.to(device=self.device, dtype=torch.float32)
        fused = fused_rows.view(b, 1, 1).to(logits.dtype) * logits.view(1, 1, -1)
        return torch.cat([fused.new_zeros(b, 1, self.num_heavy), fused], dim=-1).expand(b, h, -1)


class LoCoCoCache(FixedSlotCache):
    """The LoCoCo cache: M slots per layer and KV head (or the compressor's per-layer budgets), learned compression.

    Example::

        compressor = lococo.LoCoCoCompressor.for_model(model, num_slots=128)
        out = model.generate(**inputs, cache=lococo.LoCoCoCache(compressor))  # past_key_values= before 5.24
    """

    def __init__(self, compressor: LoCoCoCompressor, quantization=None):
        """``quantization``: the slots' storage, None for the compressor config's (16, 8, 4 or a SlotQuantization)."""
        if not isinstance(compressor, LoCoCoCompressor):
            raise TypeError(f"LoCoCoCache takes a LoCoCoCompressor, got {type(compressor).__name__}")
        needs_scores = compressor.needs_scores()
        config = compressor.config
        windowed = compressor.geometry.windowed_layers
        super().__init__([DynamicSlidingWindowLayer(sliding_window=compressor.geometry.sliding_window) if i in windowed
                          else LoCoCoLayer(layer, config.layer(i), needs_scores, quantization)
                          for i, layer in enumerate(compressor.layers)], compressor.geometry.num_kv_heads)
        self.windowed_layers = tuple(windowed)
        self.compressor = compressor
        self.config = compressor.config
