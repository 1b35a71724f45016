"""Per-layer slot budgets (docs/design.md#per-layer-budgets): how many slots each decoder layer keeps.

A fixed-slot cache keeps M slots in every layer unless it is given one M per layer. ``Budgets`` holds
such a list with where it came from (calibrated error curves, the PyramidKV shape, a user's list) and
reads and writes the budget file that ``lococo calibrate`` produces and ``--budgets FILE`` takes.
``allocate`` spends a total by marginal gain on measured error curves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Budgets", "allocate", "per_layer_slots", "proportional_slots", "pyramid_slots", "slots_for_budget"]

FILE_FORMAT = "lococo-budgets"
FORMAT_VERSION = 1
# budget files shipped with the package, loadable by name: Budgets.load("smollm2-135m-h2o-m128")
SHIPPED_DIR = Path(__file__).resolve().parent / "pretrained" / "budgets"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Budgets:
    """One M per decoder layer, and what it was made from.

    Args:
        num_slots: M of each layer, in layer order.
        source: how they were chosen ("calibrated", "pyramid", "uniform", "manual").
        model: the geometry of the model they were made for (``lococo.ModelGeometry`` fields), or None.
        details: what ``lococo calibrate`` measured (its curves, documents and settings); free-form JSON.
    """

    num_slots: tuple[int, ...]
    source: str = "manual"
    model: dict | None = None
    details: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        slots = self.num_slots
        if isinstance(slots, (str, bytes)) or not isinstance(slots, Sequence) or not slots:
            raise ValueError(f"Budgets: num_slots must be a non-empty list of ints, got {slots!r}")
        bad = [i for i, m in enumerate(slots) if not _is_int(m) or m < 1]
        if bad:
            raise ValueError(f"Budgets: num_slots[{bad[0]}] must be an int >= 1, got {slots[bad[0]]!r}")
        object.__setattr__(self, "num_slots", tuple(slots))

    @property
    def num_layers(self) -> int:
        return len(self.num_slots)

    @property
    def total(self) -> int:
        return sum(self.num_slots)

    @property
    def mean(self) -> float:
        return self.total / self.num_layers

    def check_layers(self, num_layers: int, subject: str = "the budgets") -> None:
        if self.num_layers != num_layers:
            raise ValueError(f"{subject} give {self.num_layers} per-layer budgets; the model has {num_layers} "
                             "decoder layers")

    # --- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FILE_FORMAT, "format_version": FORMAT_VERSION, "source": self.source,
                "num_slots": list(self.num_slots), "total": self.total, "mean": round(self.mean, 3),
                "model": self.model, "details": self.details}

    def save(self, path: str | Path) -> Path:
        """Writes the budget file (JSON) and returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Budgets:
        """A budget file written by ``save`` (or ``lococo calibrate``), by path or by a shipped name.

        Errors are ValueErrors (FileNotFoundError when absent) that name the file and the field.
        """
        file = budget_file(path)
        try:
            data = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ValueError(f"{file}: not a lococo budget file (expected a JSON object with "
                             f'"format": "{FILE_FORMAT}")')
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{file}: format_version {data.get('format_version')!r} is not supported (this lococo "
                             f"reads {FORMAT_VERSION})")
        model = data.get("model")
        if model is not None and not isinstance(model, dict):
            raise ValueError(f"{file}: field model must be an object or null")
        details = data.get("details", {})
        if not isinstance(details, dict):
            raise ValueError(f"{file}: field details must be an object")
        try:
            budgets = cls(data.get("num_slots"), str(data.get("source", "manual")), model, details)
        except ValueError as exc:
            raise ValueError(f"{file}: {str(exc).removeprefix('Budgets: ')}") from None
        if "total" in data and data["total"] != budgets.total:
            raise ValueError(f"{file}: total {data['total']!r} is not the sum of num_slots ({budgets.total})")
        return budgets

    @staticmethod
    def shipped_names() -> list[str]:
        """The budget files shipped with the package, by the name ``load`` takes."""
        return sorted(p.stem for p in SHIPPED_DIR.glob("*.json")) if SHIPPED_DIR.is_dir() else []


def budget_file(path: str | Path) -> Path:
    """``path`` itself, or the shipped budget file of that name when no such path exists."""
    file = Path(path)
    if file.is_file():
        return file
    shipped = SHIPPED_DIR / f"{file.name}.json"
    if not file.exists() and shipped.is_file():
        return shipped
    names = ", ".join(Budgets.shipped_names()) or "none"
    raise FileNotFoundError(f"{path}: no budget file there, and no shipped budgets of that name (shipped: {names})")


def per_layer_slots(num_slots, num_layers: int, name: str = "num_slots") -> list[int]:
    """M of each of ``num_layers`` layers from an int, a list, a ``Budgets`` or a budget file (path or shipped name)."""
    if isinstance(num_slots, (str, Path)):
        num_slots = Budgets.load(num_slots)
    elif _is_int(num_slots):
        if num_slots < 1:
            raise ValueError(f"{name} must be >= 1, got {num_slots}")
        return [num_slots] * num_layers
    elif isinstance(num_slots, Sequence):   # Budgets checks every entry
        try:
            num_slots = Budgets(tuple(num_slots))
        except ValueError as exc:
            raise ValueError(f"{name}{str(exc).removeprefix('Budgets: num_slots')}") from None
    if isinstance(num_slots, Budgets):
        num_slots.check_layers(num_layers, name)
        return list(num_slots.num_slots)
    raise TypeError(f"{name} must be an int, a list of ints, a lococo.Budgets or a budget file, "
                    f"got {type(num_slots).__name__}")


def slots_for_budget(num_slots=None, *, compression_ratio: float | None = None, context_length: int | None = None,
                     kv_tokens: int | None = None, beta: int = 16, model=None):
    """``num_slots`` from one of the three ways to give a budget; the other two must be None.

    - ``num_slots``: M, or per-layer budgets (returned as given);
    - ``compression_ratio`` r in (0, 1]: keep r of a context's entries, M = round(r x ``context_length``), the
      context defaulting to ``model``'s ``max_position_embeddings`` (a model or its config);
    - ``kv_tokens`` N: the most entries a layer ever holds while decoding, M + beta = N, so M = N - beta.

    ValueError naming the argument when none or several are given, or a value is out of range.
    """
    given = [name for name, value in (("num_slots", num_slots), ("compression_ratio", compression_ratio),
                                      ("kv_tokens", kv_tokens)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one budget, not {' and '.join(given)}")
    if context_length is not None and compression_ratio is None:
        raise ValueError("context_length goes with compression_ratio")
    if compression_ratio is not None:
        if isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float)) or not (
                0 < compression_ratio <= 1):
            raise ValueError(f"compression_ratio must be in (0, 1], got {compression_ratio!r}")
        if context_length is None:
            config = getattr(model, "config", model)
            if hasattr(config, "get_text_config"):
                config = config.get_text_config(decoder=True)
            context_length = getattr(config, "max_position_embeddings", None)
            if context_length is None:
                raise ValueError("compression_ratio needs context_length (the model gives no max_position_embeddings)")
        if not _is_int(context_length) or context_length < 1:
            raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
        return max(1, round(compression_ratio * context_length))
    if kv_tokens is not None:
        if not _is_int(kv_tokens) or kv_tokens < beta + 1:
            raise ValueError(f"kv_tokens must be an integer above beta = {beta} (M = kv_tokens - beta), got "
                             f"{kv_tokens!r}")
        return kv_tokens - beta
    return num_slots


def _round_to_total(shares: Sequence[float], total: int, floor: int) -> list[int]:
    """Integers >= floor, each near its share, that sum to ``total`` (largest remainders)."""
    base = [max(floor, math.floor(s)) for s in shares]
    left = total - sum(base)
    order = sorted(range(len(shares)), key=lambda i: (shares[i] - math.floor(shares[i])), reverse=True)
    step = 1 if left >= 0 else -1
    while left:
        moved = False
        for i in order:
            if left == 0:
                break
            if step < 0 and base[i] <= floor:
                continue
            base[i] += step
            left -= step
            moved = True
        if not moved:
            raise ValueError(f"a total of {total} slots cannot give every layer at least {floor}")
    return base


def pyramid_slots(num_layers: int, mean: int, last_share: float = 1 / 20, floor: int = 1) -> list[int]:
    """The PyramidKV shape: linearly fewer slots with depth, ``mean`` on average.

    The last layer gets ``mean * last_share`` (PyramidKV's 1/beta with beta = 20), at least ``floor``;
    the first gets what keeps the mean.
    """
    if num_layers < 1 or mean < floor:
        raise ValueError(f"pyramid budgets need num_layers >= 1 and mean >= floor, got {num_layers}, {mean}, {floor}")
    if num_layers == 1:
        return [mean]
    last = max(float(floor), mean * last_share)
    first = 2 * mean - last
    shares = [first + (last - first) * i / (num_layers - 1) for i in range(num_layers)]
    return _round_to_total(shares, mean * num_layers, floor)


def _convex_decreasing(grid: Sequence[int], errors: Sequence[float]) -> list[float]:
    """The lower convex envelope of a non-increasing error curve, at the grid points.

    Greedy allocation by marginal gain is optimal on convex curves; on a measured one it would stop
    at a local plateau before a larger drop further on.
    """
    values = []
    best = math.inf
    for e in errors:  # a layer never gets worse with more slots: noise in the measurement aside
        best = min(best, e)
        values.append(best)
    hull: list[int] = []
    for i in range(len(grid)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies above the segment a-i: drop it
            if (values[b] - values[a]) * (grid[i] - grid[a]) >= (values[i] - values[a]) * (grid[b] - grid[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    out = []
    for m in grid:
        j = max(k for k in range(len(hull)) if grid[hull[k]] <= m)
        if j == len(hull) - 1:
            out.append(values[hull[j]])
        else:
            a, b = hull[j], hull[j + 1]
            out.append(values[a] + (values[b] - values[a]) * (m - grid[a]) / (grid[b] - grid[a]))
    return out


def _interpolate(grid: Sequence[int], values: Sequence[float], m: float) -> float:
    if m <= grid[0]:
        return values[0]
    if m >= grid[-1]:
        return values[-1]
    j = max(k for k in range(len(grid)) if grid[k] <= m)
    return values[j] + (values[j + 1] - values[j]) * (m - grid[j]) / (grid[j + 1] - grid[j])


def allocate(grid: Sequence[int], errors: Sequence[Sequence[float]], total: int, floor: int,
             step: int = 1, cap: int | None = None) -> list[int]:
    """Per-layer M that spend ``total`` slots where they remove the most measured error.

    ``errors[l][j]`` is layer l's error with ``grid[j]`` slots (``grid`` increasing). Every layer starts
    at ``floor``; then each ``step`` slots go to the layer whose error they lower most, on the convex
    envelope of its curve (linear between grid points, flat past the last one), until ``total`` is spent.
    ``cap`` (default: the last grid point) bounds any layer's M.
    """
    num_layers = len(errors)
    grid = [int(m) for m in grid]
    if num_layers < 1 or len(grid) < 2 or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError("allocate needs curves for at least one layer on an increasing grid of two points or more")
    if any(len(curve) != len(grid) for curve in errors):
        raise ValueError("every error curve must have one value per grid point")
    cap = grid[-1] if cap is None else cap
    if step < 1 or floor < 1 or cap < floor:
        raise ValueError(f"allocate needs step >= 1 and 1 <= floor <= cap, got {step}, {floor}, {cap}")
    if not floor * num_layers <= total <= cap * num_layers:
        raise ValueError(f"a total of {total} slots is outside [{floor} x {num_layers}, {cap} x {num_layers}]: "
                         "lower the floor or raise the largest calibrated M")
    curves = [_convex_decreasing(grid, curve) for curve in errors]
    slots = [floor] * num_layers
    left = total - floor * num_layers
    while left > 0:
        best, gain = None, -math.inf
        for layer in range(num_layers):
            take = min(step, left, cap - slots[layer])
            if take <= 0:
                continue
            drop = (_interpolate(grid, curves[layer], slots[layer])
                    - _interpolate(grid, curves[layer], slots[layer] + take)) / take
            if drop > gain:
                best, gain = layer, drop
        take = min(step, left, cap - slots[best])
        slots[best] += take
        left -= take
    return slots


def proportional_slots(grid: Sequence[int], errors: Sequence[Sequence[float]], total: int, floor: int,
                       power: float = 0.5) -> list[int]:
    """Per-layer M: ``floor`` each, the rest of ``total`` in proportion to error ** ``power`` at the mean M.

    The error of each layer is read off its curve (linear between grid points) at M = total / layers.
    A softer rule than ``allocate``: with ``power`` < 1 the layers whose error barely falls with more
    slots (the largest ones, often) do not take the whole budget.
    """
    num_layers = len(errors)
    if num_layers < 1 or floor * num_layers > total or not 0 < power <= 1:
        raise ValueError(f"proportional budgets need layers, floor x layers <= total and power in (0, 1], got "
                         f"{num_layers}, {floor}, {total}, {power}")
    at_mean = [_interpolate(list(grid), list(curve), total / num_layers) ** power for curve in errors]
    spare = total - floor * num_layers
    weight = sum(at_mean)
    shares = [floor + (spare * w / weight if weight else spare / num_layers) for w in at_mean]
    return _round_to_total(shares, total, floor)
