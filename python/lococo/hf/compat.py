"""What differs between the transformers versions lococo supports, in one place.

lococo's caches and scored attention build on transformers internals (cache layers,
``AttentionInterface``, ``AttentionMaskInterface``, the mask sizes) that change between minor
releases, so the versions it is tested with are checked once, when ``lococo.hf`` is imported.
"""

from __future__ import annotations

import inspect
import warnings

from ..extras import TESTED_TRANSFORMERS, require, tested_transformers_text

# First of lococo.hf's imports (see lococo/hf/__init__.py): without transformers, the error names the extra.
require("transformers", "lococo.hf", "hf")

from packaging.version import InvalidVersion, Version  # noqa: E402  (a dependency of transformers)

__all__ = ["TESTED_TRANSFORMERS", "UntestedTransformersWarning", "cache_kwarg", "check_transformers_version",
           "get_output_cache"]

# TESTED_TRANSFORMERS: (first, last) minor releases of transformers the test suite runs against, inclusive
# (defined in lococo.extras, which lococo.info reads without importing transformers).


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is outside the range of versions lococo is tested with."""


def check_transformers_version(version: str | None = None) -> bool:
    """True when ``version`` (default: the installed transformers) is in the tested range.

    Outside it, or when the version cannot be read, warns with ``UntestedTransformersWarning``
    and returns False; lococo may still work, so nothing is refused.
    """
    if version is None:
        import transformers

        version = transformers.__version__
    (first_major, first_minor), (last_major, last_minor) = TESTED_TRANSFORMERS
    tested = tested_transformers_text()
    try:
        release = Version(version).release
    except InvalidVersion:
        warnings.warn(f"lococo: cannot read the transformers version {version!r}; lococo is tested with "
                      f"transformers {tested}", UntestedTransformersWarning, stacklevel=2)
        return False
    major_minor = (release + (0,))[:2]
    if TESTED_TRANSFORMERS[0] <= major_minor <= TESTED_TRANSFORMERS[1]:
        return True
    warnings.warn(
        f"lococo is tested with transformers {tested}, but transformers {version} is installed. lococo's caches "
        "and attention build on transformers internals that change between releases, so generation may fail "
        f"or differ. Install a tested version: pip install 'transformers>={first_major}.{first_minor},"
        f"<{last_major}.{last_minor + 1}'", UntestedTransformersWarning, stacklevel=2)
    return False


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


check_transformers_version()
