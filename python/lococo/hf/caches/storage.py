"""How a fixed-slot layer holds its entries: in the model's dtype, or with the compressed slots quantized.

A storage holds the M slots of the latest compression and the entries appended since (docs/design.md#quantized-slots).
Every fixed-slot layer owns one, whatever its compression (LoCoCo, H2O, TOVA, StreamingLLM), so every cache
kind gets every storage. The layer reads ``entries()`` (all of them, in the model's dtype) to compress and to
attend, ``replace``s them with the new slots after a compression and ``append``s each call's new entries.

``keys`` and ``values`` are the entries held in the model's dtype: all of them in ``FloatStorage``, the
appended ones in ``QuantizedStorage`` (as transformers' ``QuantizedLayer`` keeps its residual).
"""

from __future__ import annotations

import torch

from ...quantization import QuantizedTensor, SlotQuantization, fake_quantize

__all__ = ["FloatStorage", "QuantizedStorage", "make_storage"]


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class FloatStorage:
    """Slots and appended entries in the model's dtype, one tensor for the keys and one for the values."""

    quantization: SlotQuantization | None = None

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def start(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Empty storage for entries like ``keys`` and ``values`` [b, h, n, d]."""
        self.keys, self.values = keys[:, :, :0], values[:, :, :0]

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)

    def packed_slots(self) -> tuple[QuantizedTensor, QuantizedTensor] | None:
        """The slots as codes and scales, for an attention that reads them in blocks; None when not packed."""
        return None

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)

    def map_rows(self, fn) -> None:
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)

    def detach_(self) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys.detach(), self.values.detach()

    def clear(self) -> None:
        self.keys = self.values = None


class QuantizedStorage(FloatStorage):
    """The compressed slots in 8 or 4 bits with their scales; the entries appended since in the model's dtype.

    Decoding quantizes once per compression (every beta + 1 steps). While gradients flow into the slots
    (``lococo distill``), they are kept rounded through the quantization with a straight-through gradient
    instead of packed (``fake_quantize``): the compressor trains for the storage it will live in.
    """

    def __init__(self, quantization: SlotQuantization):
        super().__init__()
        self.quantization = quantization
        self.slots: tuple[QuantizedTensor, QuantizedTensor] | tuple[torch.Tensor, torch.Tensor] | None = None

    def start(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.quantization.check(keys.shape[-1])
        self.quantization.check(values.shape[-1])
        super().start(keys, values)
        self.slots = None

    @property
    def num_slots_stored(self) -> int:
        return 0 if self.slots is None else self.slots[0].shape[-2]

    @property
    def length(self) -> int:
        return self.num_slots_stored + super().length

    def _slot_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.slots
        if isinstance(k, QuantizedTensor):
            return k.dequantize(), v.dequantize()
        return k, v

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slots is None:
            return self.keys, self.values
        k, v = self._slot_tensors()
        return torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        spec = self.quantization
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            self.slots = fake_quantize(keys, spec, keys=True), fake_quantize(values, spec, keys=False)
        else:
            self.slots = spec.quantize(keys, keys=True), spec.quantize(values, keys=False)
        self.keys, self.values = keys[:, :, :0].detach(), values[:, :, :0].detach()

    def packed_slots(self) -> tuple[QuantizedTensor, QuantizedTensor] | None:
        return self.slots if self.slots is not None and isinstance(self.slots[0], QuantizedTensor) else None

    def nbytes(self) -> int:
        """Codes and scales of the slots (or their rounded tensors while training) and the appended entries."""
        slots = 0 if self.slots is None else sum(
            s.nbytes() if isinstance(s, QuantizedTensor) else tensor_bytes(s) for s in self.slots)
        return slots + tensor_bytes(self.keys, self.values)

    def map_rows(self, fn) -> None:
        super().map_rows(fn)
        if self.slots is not None:
            self.slots = tuple(s.map_rows(fn) if isinstance(s, QuantizedTensor) else fn(s) for s in self.slots)

    def detach_(self) -> None:
        super().detach_()
        if self.slots is not None and not isinstance(self.slots[0], QuantizedTensor):
            self.slots = (self.slots[0].detach(), self.slots[1].detach())

    def clear(self) -> None:
        super().clear()
        self.slots = None


def make_storage(quantization) -> FloatStorage:
    """The storage of a quantization setting (None or 16: the model's dtype; 8, 4 or a SlotQuantization)."""
    spec = SlotQuantization.of(quantization)
    return FloatStorage() if spec is None else QuantizedStorage(spec)
