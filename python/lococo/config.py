"""LoCoCoConfig: the hyper-parameters of a LoCoCo cache (docs/design.md#notation-and-defaults), validated once."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from .quantization import SlotQuantization

__all__ = ["LoCoCoConfig"]

_DEFAULT_RHO = 0.5
# the most slots a layer may keep: far above any useful M, and within every kernel's int32 indexing
MAX_SLOTS = 1 << 20
# Fields added after the first release of format 1, with the value that gives the behaviour of configs
# saved before them; every other field must be present in a saved config.
ADDED_FIELDS = {"slot_bias": False, "quantization": None}


def _fail(message: str) -> None:
    raise ValueError(f"LoCoCoConfig: {message}")


def _need(ok: bool, message: str) -> None:
    if not ok:
        _fail(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, init=False)
class LoCoCoConfig:
    """Hyper-parameters of a LoCoCo cache and its compressor.

    Args:
        num_slots: M, the slots kept per layer and KV head after each compression: one int for every
            layer, or one per decoder layer (per-layer budgets, docs/design.md#per-layer-budgets; a
            ``lococo.Budgets`` gives them). Read a layer's M through ``layer(i)`` or ``slots_per_layer``.
        rho: fraction of the M slots that are fused; the rest are heavy hitters. The fused slots
            are C = round(M * rho) (halves round up), the heavy hitters H = M - C.
        num_heavy: H directly, instead of ``rho`` (then C = M - H and rho = C / M); give one or
            the other.
        beta: slack: a layer compresses when it stores more than M + beta entries.
        kernel_size: k, the odd kernel size of the convolution.
        num_local: l, the most recent entries always kept verbatim (counted inside H).
        alpha_init: initial value of the learned blend scalar alpha (not clamped).
        init_std: standard deviation of the convolution weights at initialisation.
        chunk_size: B, the chunk length for chunked prefill, training and evaluation.
        slot_bias: a learned attention logit per fused slot, added to the attention of every query to
            that slot while it is stored (an extension of the paper; off by default). A fused slot stands
            for many entries but attention weighs it as one key: the logit lets training give it the
            share of attention its entries drew.
        quantization: how the compressed slots are stored (docs/design.md#quantized-slots): None (the
            model's dtype), 8 or 4 bits, or a ``lococo.SlotQuantization``. A compressor trained with
            quantized slots carries it, so that its cache stores them the same way.

    ``num_heavy`` (H) and ``num_fused`` (C) are read as properties; ``rho`` is what is stored. With
    per-layer budgets every layer has its own M, H and C: ``layer(i)`` is layer i's config (one int M).
    """

    num_slots: int | tuple[int, ...] = 128
    rho: float = _DEFAULT_RHO
    beta: int = 16
    kernel_size: int = 21
    num_local: int = 0
    alpha_init: float = 0.5
    init_std: float = 1.0
    chunk_size: int = 128
    slot_bias: bool = False
    quantization: SlotQuantization | None = None

    def __init__(self, num_slots: int | Sequence[int] = 128, rho: float = _DEFAULT_RHO, num_heavy: int | None = None,
                 beta: int = 16, kernel_size: int = 21, num_local: int = 0, alpha_init: float = 0.5,
                 init_std: float = 1.0, chunk_size: int = 128, slot_bias: bool = False, quantization=None):
        num_slots = getattr(num_slots, "num_slots", num_slots)  # a lococo.Budgets
        if isinstance(num_slots, Sequence) and not isinstance(num_slots, str):
            _need(len(num_slots) >= 1 and all(_is_int(m) for m in num_slots),
                  f"num_slots must be an int or a non-empty list of ints (one per layer), got {list(num_slots)!r}")
            bad = [i for i, m in enumerate(num_slots) if not 1 <= m <= MAX_SLOTS]
            if bad:
                _fail(f"num_slots (M) must be in [1, {MAX_SLOTS}] in every layer; layer {bad[0]} has "
                      f"{num_slots[bad[0]]}")
            num_slots = tuple(num_slots)
        else:
            _need(_is_int(num_slots), f"num_slots must be an int or a list of ints (one per layer), got {num_slots!r}")
            _need(1 <= num_slots <= MAX_SLOTS, f"num_slots (M) must be in [1, {MAX_SLOTS}], got {num_slots}")
        for name, value in (("beta", beta), ("kernel_size", kernel_size),
                            ("num_local", num_local), ("chunk_size", chunk_size)):
            _need(_is_int(value), f"{name} must be an int, got {value!r}")
        _need(isinstance(slot_bias, bool), f"slot_bias must be true or false, got {slot_bias!r}")
        try:
            quantization = SlotQuantization.of(quantization)
        except ValueError as exc:
            _fail(str(exc))
        for name, value in (("rho", rho), ("alpha_init", alpha_init), ("init_std", init_std)):
            _need(isinstance(value, (int, float)) and not isinstance(value, bool),
                  f"{name} must be a number, got {value!r}")
        if num_heavy is not None:
            _need(_is_int(num_heavy), f"num_heavy must be an int or None, got {num_heavy!r}")
            _need(_is_int(num_slots), "num_heavy needs one M for every layer; with per-layer num_slots give rho")
            _need(rho == _DEFAULT_RHO,
                  f"give either rho or num_heavy, not both (got rho={rho}, num_heavy={num_heavy})")
            _need(0 <= num_heavy < num_slots,
                  f"num_heavy must be in [0, num_slots - 1 = {num_slots - 1}] so that at least one slot is "
                  f"fused, got {num_heavy}")
            rho = (num_slots - num_heavy) / num_slots
        for name, value in (("num_slots", num_slots), ("rho", float(rho)), ("beta", beta),
                            ("kernel_size", kernel_size), ("num_local", num_local), ("alpha_init", alpha_init),
                            ("init_std", init_std), ("chunk_size", chunk_size), ("slot_bias", slot_bias),
                            ("quantization", quantization)):
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        if self.per_layer:
            for i in range(len(self.num_slots)):
                try:
                    self.layer(i)
                except ValueError as exc:
                    _fail(f"layer {i} (M = {self.num_slots[i]}): {str(exc).removeprefix('LoCoCoConfig: ')}")
            return
        _need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        _need(self.kernel_size >= 1 and self.kernel_size % 2 == 1,
              f"kernel_size must be a positive odd number, got {self.kernel_size}")
        _need(self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")
        _need(math.isfinite(self.rho) and 0.0 <= self.rho <= 1.0, f"rho must be in [0, 1], got {self.rho}")
        _need(self.num_fused >= 1,
              f"rho = {self.rho} leaves no fused slot for num_slots = {self.num_slots}; use "
              "lococo.H2OCache for pure top-M selection")
        _need(0 <= self.num_local <= self.num_heavy,
              f"num_local must be in [0, H = {self.num_heavy}] (the recent entries are kept among the heavy "
              f"hitters), got {self.num_local}")
        _need(math.isfinite(self.alpha_init), f"alpha_init must be finite, got {self.alpha_init}")
        _need(math.isfinite(self.init_std) and self.init_std > 0, f"init_std must be > 0, got {self.init_std}")

    # --- per-layer budgets ---------------------------------------------------------------------
    @property
    def per_layer(self) -> bool:
        """True when ``num_slots`` gives one M per layer."""
        return isinstance(self.num_slots, tuple)

    def layer(self, index: int) -> LoCoCoConfig:
        """Layer ``index``'s config: this one with that layer's M (itself when M is the same everywhere)."""
        if not self.per_layer:
            return self
        if not 0 <= index < len(self.num_slots):
            raise IndexError(f"layer {index} is out of range for {len(self.num_slots)} per-layer budgets")
        return _layer_config(self, index)

    def slots_per_layer(self, num_layers: int) -> list[int]:
        """M of each of ``num_layers`` layers; ValueError when per-layer budgets give another count."""
        if not self.per_layer:
            return [self.num_slots] * num_layers
        if len(self.num_slots) != num_layers:
            raise ValueError(f"LoCoCoConfig: num_slots gives {len(self.num_slots)} per-layer budgets for a model with "
                             f"{num_layers} decoder layers")
        return list(self.num_slots)

    @property
    def max_slots(self) -> int:
        """The largest M of any layer."""
        return max(self.num_slots) if self.per_layer else self.num_slots

    def _require_uniform(self, name: str) -> None:
        if self.per_layer:
            raise ValueError(f"LoCoCoConfig: {name} differs by layer with per-layer num_slots; read it from "
                             "config.layer(i)")

    @property
    def num_fused(self) -> int:
        """C, the fused slots (of every layer; with per-layer budgets read ``layer(i).num_fused``)."""
        self._require_uniform("num_fused")
        return int(math.floor(self.num_slots * self.rho + 0.5))

    @property
    def num_heavy(self) -> int:
        """H, the heavy-hitter slots (of every layer; with per-layer budgets read ``layer(i).num_heavy``)."""
        self._require_uniform("num_heavy")
        return self.num_slots - self.num_fused

    @property
    def fused_slots(self) -> int:
        """Deprecated name of ``num_fused``."""
        warnings.warn("LoCoCoConfig.fused_slots is deprecated; use num_fused", DeprecationWarning, stacklevel=2)
        return self.num_fused

    @property
    def heavy_slots(self) -> int:
        """Deprecated name of ``num_heavy``."""
        warnings.warn("LoCoCoConfig.heavy_slots is deprecated; use num_heavy", DeprecationWarning, stacklevel=2)
        return self.num_heavy

    @classmethod
    def field_names(cls) -> list[str]:
        """The fields ``to_dict`` writes (a saved config must hold all but ``ADDED_FIELDS``)."""
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if self.per_layer:
            data["num_slots"] = list(self.num_slots)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LoCoCoConfig:
        """A config from ``to_dict``'s fields; ``num_heavy`` (written by lococo 0.1: null unless H was given) too."""
        if not isinstance(data, dict):
            _fail(f"expected a dict of fields, got {type(data).__name__}")
        known = set(cls.field_names())
        unknown = sorted(set(data) - known - {"num_heavy"})
        if unknown:
            _fail(f"unknown fields {unknown}; known fields are {sorted(known)}")
        fields = dict(data)
        if fields.get("num_heavy", 0) is None:
            del fields["num_heavy"]
        return cls(**fields)


@functools.lru_cache(maxsize=4096)
def _layer_config(config: LoCoCoConfig, index: int) -> LoCoCoConfig:
    fields = config.to_dict()
    fields["num_slots"] = config.num_slots[index]
    return LoCoCoConfig(**fields)
