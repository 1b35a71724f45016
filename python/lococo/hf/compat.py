"""What differs between the transformers versions lococo supports, in one place."""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """The name under which this transformers version passes a cache: "cache" (5.24) or "past_key_values"."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def get_output_cache(outputs):
    """The cache in a model output, whatever this transformers version calls it (None if absent)."""
    for name in ("cache", "past_key_values"):
        value = outputs.get(name) if isinstance(outputs, dict) else getattr(outputs, name, None)
        if value is not None:
            return value
    return None
