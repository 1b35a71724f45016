"""LoCoCoConfig: the hyper-parameters of a LoCoCo cache (SPEC section 1), validated once."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["LoCoCoConfig"]


@dataclass(frozen=True)
class LoCoCoConfig:
    """Hyper-parameters of a LoCoCo cache and its compressor.

    Args:
        num_slots: M, the slots kept per layer and KV head after each compression.
        rho: fraction of the M slots that are fused; the rest are heavy hitters. C = round(M * rho)
            (halves round up), H = M - C. Ignored when ``num_heavy`` is given.
        num_heavy: H directly (then C = M - H); mutually exclusive with a non-default ``rho``.
        beta: slack: a layer compresses when it stores more than M + beta entries.
        kernel_size: k, the odd kernel size of the convolution.
        num_local: l, the most recent entries always kept verbatim (counted inside H).
        alpha_init: initial value of the learned blend scalar alpha (not clamped).
        init_std: standard deviation of the convolution weights at initialisation.
        chunk_size: B, the chunk length for chunked prefill, training and evaluation.
    """

    num_slots: int = 128
    rho: float = 0.5
    num_heavy: int | None = None
    beta: int = 16
    kernel_size: int = 21
    num_local: int = 0
    alpha_init: float = 0.5
    init_std: float = 1.0
    chunk_size: int = 128

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"LoCoCoConfig: {msg}")

        for name in ("num_slots", "beta", "kernel_size", "num_local", "chunk_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool),
                 f"{name} must be an int, got {value!r}")
        for name in ("rho", "alpha_init", "init_std"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool),
                 f"{name} must be a number, got {value!r}")
        need(self.num_slots >= 1, f"num_slots (M) must be >= 1, got {self.num_slots}")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.kernel_size >= 1 and self.kernel_size % 2 == 1,
             f"kernel_size must be a positive odd number, got {self.kernel_size}")
        need(self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")
        need(math.isfinite(self.rho) and 0.0 <= self.rho <= 1.0, f"rho must be in [0, 1], got {self.rho}")
        if self.num_heavy is not None:
            need(isinstance(self.num_heavy, int) and not isinstance(self.num_heavy, bool),
                 f"num_heavy must be an int or None, got {self.num_heavy!r}")
            need(self.rho == LoCoCoConfig.rho,
                 f"give either rho or num_heavy, not both (got rho={self.rho}, num_heavy={self.num_heavy})")
            need(0 <= self.num_heavy < self.num_slots,
                 f"num_heavy must be in [0, num_slots - 1 = {self.num_slots - 1}] so that at least one "
                 f"slot is fused, got {self.num_heavy}")
        need(self.fused_slots >= 1,
             f"rho = {self.rho} leaves no fused slot for num_slots = {self.num_slots}; use "
             "lococo.H2OCache for pure top-M selection")
        need(0 <= self.num_local <= self.heavy_slots,
             f"num_local must be in [0, H = {self.heavy_slots}] (the recent entries are kept among the heavy "
             f"hitters), got {self.num_local}")
        need(math.isfinite(self.alpha_init), f"alpha_init must be finite, got {self.alpha_init}")
        need(math.isfinite(self.init_std) and self.init_std > 0, f"init_std must be > 0, got {self.init_std}")

    @property
    def fused_slots(self) -> int:
        """C, the fused slots."""
        if self.num_heavy is not None:
            return self.num_slots - self.num_heavy
        return int(math.floor(self.num_slots * self.rho + 0.5))

    @property
    def heavy_slots(self) -> int:
        """H, the heavy-hitter slots."""
        return self.num_slots - self.fused_slots

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoCoCoConfig:
        if not isinstance(data, dict):
            raise ValueError(f"LoCoCoConfig: expected a dict of fields, got {type(data).__name__}")
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LoCoCoConfig: unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)
