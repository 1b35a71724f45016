"""The caches `lococo eval` and the passkey task compare, their names, per-layer budgets and slot storage."""

from __future__ import annotations

METHODS = ("full", "lococo", "h2o", "tova", "streaming")
METHOD_LABELS = {"full": "full cache", "lococo": "LoCoCo", "h2o": "H2O", "tova": "TOVA",
                 "streaming": "StreamingLLM"}
KEEPS_RECENT = ("h2o", "tova")   # the baselines that take --num-local
# --budgets values that are shapes, not files: the budgets follow from the mean M and the layer count
BUDGET_SHAPES = ("uniform", "pyramid")


def method_quantization(method: str, args, ev):
    """The ``SlotQuantization`` of a method's slots (None: the model's dtype): --kv-bits, else the compressor's."""
    if method == "full":
        return None
    if getattr(args, "quantization", None) is not None:
        return args.quantization or None    # False: --kv-bits 16
    return None if ev.compressor is None else ev.compressor.config.quantization


def method_cache(method: str, args, ev):
    """A fresh cache of one method: the baselines at the same slots per layer, beta and slot storage; H2O, TOVA
    with --num-local."""
    from ..hf.caches import build_cache

    if method == "full":
        return build_cache(method, ev.model)
    quantization = method_quantization(method, args, ev) or 16
    if method == "lococo":
        return build_cache(method, ev.model, ev.compressor, quantization=quantization)
    return build_cache(method, ev.model, num_slots=args.num_slots, beta=args.beta, num_local=args.num_local,
                       quantization=quantization)


def method_label(method: str, num_local: int, budgets: str | None = None, storage: str | None = None) -> str:
    """The method's name in tables: H2O's or TOVA's recent window, the budgets when they differ by layer, and the
    slots' storage when quantized (``SlotQuantization.label()``)."""
    label = METHOD_LABELS[method]
    notes = [f"{num_local} recent"] if method in KEEPS_RECENT and num_local else []
    if budgets and method != "full":
        notes.append(f"{budgets} budgets")
    if storage and method != "full":
        notes.append(storage)
    return f"{label} ({', '.join(notes)})" if notes else label


def resolve_budgets(spec: str | None, num_layers: int, mean: int, floor: int) -> tuple[list[int] | int, str | None]:
    """(slots: an int or one per layer, label or None for uniform) of a --budgets value.

    ``spec``: None or "uniform" (``mean`` everywhere), "pyramid" (the PyramidKV shape at that mean, each
    layer at least ``floor``), or a budget file (path or shipped name), labelled by its name.
    """
    from ..budgets import Budgets, pyramid_slots

    if spec in (None, "uniform"):
        return mean, None
    if spec == "pyramid":
        return pyramid_slots(num_layers, mean, floor=floor), "PyramidKV"
    budgets = Budgets.load(spec)
    budgets.check_layers(num_layers, f"--budgets {spec}")
    error = (budgets.details or {}).get("error", "relative")   # calibrate --error: "loss-calibrated", ...
    label = budgets.source if error == "relative" or budgets.source != "calibrated" else f"{error}-calibrated"
    return list(budgets.num_slots), label
