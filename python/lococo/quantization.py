"""Quantized slots: 8- and 4-bit storage of a fixed-slot cache's compressed entries (docs/design.md#quantized-slots).

Symmetric quantization in groups: each run of ``group_size`` values shares one 16-bit scale (its largest
magnitude over the code range), stored beside the codes. 8-bit codes are int8 (or fp8 e4m3 with
``format="fp8"``); 4-bit codes in [-7, 7] are packed two to a byte, the first value of each pair in the low
nibble, so that their bytes are real. Values are grouped along the head dimension (one scale per entry and
group of channels: "token" axis) or, for keys with ``key_axis="channel"`` (KIVI, KVQuant), along the slots
(one scale per channel and group of slots).

Re-quantizing dequantized values with the "token" axis gives them back unchanged (a group's largest value
is a code's end, so its scale is found again): slots that a compression keeps as they were lose nothing more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["QuantizedTensor", "SlotQuantization", "fake_quantize"]

SCALE_DTYPE = torch.float16
_SCALE_MAX = torch.finfo(SCALE_DTYPE).max
_FP8_MAX = 448.0   # the largest finite float8_e4m3fn
BIT_WIDTHS = (16, 8, 4)  # 16: the model's dtype, no quantization
KEY_AXES = ("token", "channel")
FORMATS = ("int", "fp8")
DEFAULT_GROUP = {8: 64, 4: 32}


@dataclass(frozen=True)
class SlotQuantization:
    """How the compressed slots of a fixed-slot cache are stored.

    Args:
        bits: 8 or 4 bits per value.
        group_size: values that share one scale (default 64 at 8 bits, 32 at 4): along the head dimension,
            or along the slots for keys with ``key_axis="channel"``. It must divide the head dimension.
        key_axis: "token" (keys grouped along the head dimension, as values always are) or "channel"
            (each key channel scaled over a group of slots).
        format: "int" (symmetric integers) or "fp8" (float8 e4m3 with a scale; 8 bits only).
    """

    bits: int = 8
    group_size: int | None = None
    key_axis: str = "token"
    format: str = "int"

    def __post_init__(self):
        if self.bits not in (8, 4) or isinstance(self.bits, bool):
            raise ValueError(f"quantization bits must be 8 or 4 (16: no quantization), got {self.bits!r}")
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP[self.bits])
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"quantization group_size must be a positive int, got {self.group_size!r}")
        if self.bits == 4 and self.group_size % 2:
            raise ValueError(f"4-bit quantization packs two values a byte: group_size must be even, got "
                             f"{self.group_size}")
        if self.key_axis not in KEY_AXES:
            raise ValueError(f"quantization key_axis must be one of {KEY_AXES}, got {self.key_axis!r}")
        if self.format not in FORMATS:
            raise ValueError(f"quantization format must be one of {FORMATS}, got {self.format!r}")
        if self.format == "fp8" and self.bits != 8:
            raise ValueError(f"the fp8 format has 8 bits, got bits={self.bits}")

    @classmethod
    def of(cls, value, name: str = "quantization") -> SlotQuantization | None:
        """None for None or 16 (the model's dtype); 8 or 4: that width's defaults; a dict or a SlotQuantization."""
        if value is None or isinstance(value, SlotQuantization):
            return value
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as exc:
                raise ValueError(f"{name}: {exc}") from None
        if isinstance(value, int) and not isinstance(value, bool) and value in BIT_WIDTHS:
            return None if value == 16 else cls(bits=value)
        raise ValueError(f"{name} must be 16, 8, 4, a lococo.SlotQuantization or None, got {value!r}")

    def check(self, head_dim: int) -> None:
        """ValueError naming the group size when it does not fit ``head_dim`` (the keys' and values' last dimension)."""
        if head_dim % self.group_size:
            raise ValueError(f"quantization group_size {self.group_size} does not divide the head dimension "
                             f"{head_dim}: choose a divisor of {head_dim}")

    def entry_bytes(self, head_dim: int) -> float:
        """Bytes at rest of one key and one value of one KV head, scales included (amortised for channel keys)."""
        self.check(head_dim)
        codes = head_dim * self.bits / 8
        scales = head_dim / self.group_size * SCALE_DTYPE.itemsize
        return 2 * (codes + scales)

    @property
    def short_name(self) -> str:
        """int8, int4 or fp8."""
        return "fp8" if self.format == "fp8" else f"int{self.bits}"

    def label(self) -> str:
        keys = ", channel keys" if self.key_axis == "channel" else ""
        return f"{self.short_name}, groups of {self.group_size}{keys}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def quantize(self, x: torch.Tensor, keys: bool) -> QuantizedTensor:
        """``x`` [..., n, d] (keys or values) as a QuantizedTensor."""
        channel = keys and self.key_axis == "channel"
        return QuantizedTensor.of(x, self, channel)


class QuantizedTensor:
    """Codes and scales of one [..., n, d] tensor; ``dequantize`` gives it back in ``dtype``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, spec: SlotQuantization, channel: bool,
                 shape: tuple[int, ...], dtype: torch.dtype):
        self.codes, self.scales, self.spec, self.channel = codes, scales, spec, channel
        self.shape, self.dtype = shape, dtype

    @classmethod
    def of(cls, x: torch.Tensor, spec: SlotQuantization, channel: bool) -> QuantizedTensor:
        shape = tuple(x.shape)
        if channel:   # group along the slots: [..., d, n], padded to whole groups
            x = x.transpose(-1, -2)
            x = torch.nn.functional.pad(x, (0, -x.shape[-1] % spec.group_size))
        else:
            spec.check(x.shape[-1])
        codes, scales = _quantize_last(x, spec)
        return cls(codes, scales, spec, channel, shape, x.dtype)

    @property
    def length(self) -> int:
        return self.shape[-2]

    def dequantize(self) -> torch.Tensor:
        return self.dequantize_slots(0, self.length)

    def dequantize_slots(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Entries [start, stop) along the slot axis (dim -2) in ``dtype`` (default: the original's), without the rest.

        With channel keys ``start`` must be a multiple of the group size (``block_size`` gives such blocks).
        """
        dtype = self.dtype if dtype is None else dtype
        if not self.channel:
            return _dequantize_last(self.codes[..., start:stop, :], self.scales[..., start:stop, :], self.spec, dtype)
        group = self.spec.group_size
        if start % group:
            raise ValueError(f"channel-scaled slots are read from a multiple of the group size {group}, not {start}")
        padded = -(-stop // group) * group
        per_byte = 8 // self.spec.bits
        x = _dequantize_last(self.codes[..., start // per_byte: padded // per_byte],
                             self.scales[..., start // group: padded // group], self.spec, dtype)
        return x[..., : stop - start].transpose(-1, -2)

    def block_size(self, wanted: int) -> int:
        """The slots read at a time near ``wanted``: a multiple of the group size for channel keys."""
        if not self.channel:
            return max(1, wanted)
        return max(1, wanted // self.spec.group_size) * self.spec.group_size

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def map_rows(self, fn) -> QuantizedTensor:
        """The same tensor with ``fn`` applied to the batch dimension of codes and scales (reorder, select)."""
        codes, scales = fn(self.codes), fn(self.scales)
        return QuantizedTensor(codes, scales, self.spec, self.channel, (codes.shape[0], *self.shape[1:]), self.dtype)


def _quantize_last(x: torch.Tensor, spec: SlotQuantization) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8/int8 [..., d * bits / 8]) and scales (fp16 [..., d / group]) of x grouped along its last dim."""
    *lead, d = x.shape
    groups = x.float().reshape(*lead, d // spec.group_size, spec.group_size)
    top = _FP8_MAX if spec.format == "fp8" else float(2 ** (spec.bits - 1) - 1)
    # the scale is rounded to its stored dtype first, so that the codes are those of the scale used to read them
    scales = (groups.abs().amax(-1) / top).clamp(max=_SCALE_MAX).to(SCALE_DTYPE)
    s = scales.float().unsqueeze(-1)
    scaled = (groups / torch.where(s > 0, s, torch.ones_like(s))).clamp(-top, top).reshape(*lead, d)
    if spec.format == "fp8":
        return scaled.to(torch.float8_e4m3fn).view(torch.uint8), scales
    q = scaled.round()
    if spec.bits == 8:
        return q.to(torch.int8), scales
    pairs = (q + 8).to(torch.uint8).reshape(*lead, d // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4), scales


def _dequantize_last(codes: torch.Tensor, scales: torch.Tensor, spec: SlotQuantization,
                     dtype: torch.dtype) -> torch.Tensor:
    if spec.format == "fp8":
        values = codes.view(torch.float8_e4m3fn).float()
    elif spec.bits == 8:
        values = codes.float()
    else:
        values = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2).float() - 8
    *lead, d = values.shape
    grouped = values.reshape(*lead, d // spec.group_size, spec.group_size) * scales.float().unsqueeze(-1)
    return grouped.reshape(*lead, d).to(dtype)


def fake_quantize(x: torch.Tensor, spec: SlotQuantization, keys: bool) -> torch.Tensor:
    """``x`` rounded through the quantization, with the gradient of the identity (straight-through)."""
    rounded = spec.quantize(x.detach(), keys).dequantize()
    return x + (rounded - x).detach()
