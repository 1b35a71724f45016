"""lococo's optional parts: which pip extra brings which module, and what each extra enables.

``import lococo`` needs only torch (the op, its reference and the compressor). The rest comes with
the extras of pyproject.toml's ``[project.optional-dependencies]``; a feature whose extra is missing
raises ``MissingExtraError``, a ``ModuleNotFoundError`` whose message names the extra to install.
Importing this module imports nothing beyond the standard library.
"""

from __future__ import annotations

import importlib
import importlib.metadata

__all__ = ["EXTRAS", "MODULE_EXTRA", "TESTED_TRANSFORMERS", "MissingExtraError", "install_command",
           "installed_version", "missing_extra", "require", "tested_transformers_text"]

# What each extra of pyproject.toml enables (README, "Install", has the same list).
EXTRAS = {
    "hf": "the transformers integration: lococo.hf (apply_lococo, LoCoCoCache and the baseline caches, "
          "generate(), chunked_nll) and LoCoCoCompressor.save_pretrained/from_pretrained/push_to_hub",
    "train": "the `lococo` command's recipes: assets fetch (GGUF conversion), demo, eval, passkey, train, "
             "distill and the other recipes; includes hf",
    "test": "the test suite's tools (pytest, hypothesis, numpy)",
}

# The top-level module -> the smallest extra that installs it.
MODULE_EXTRA = {
    "transformers": "hf", "safetensors": "hf", "accelerate": "hf", "huggingface_hub": "hf",
    "peft": "train", "tqdm": "train", "matplotlib": "train", "gguf": "train",
    "pytest": "test", "hypothesis": "test", "numpy": "test",
}

# (first, last) minor releases of transformers the test suite runs against, inclusive. The hf
# extra allows exactly these: transformers>=5.17,<5.26.
TESTED_TRANSFORMERS = ((5, 17), (5, 25))


def tested_transformers_text() -> str:
    (first_major, first_minor), (last_major, last_minor) = TESTED_TRANSFORMERS
    return f"{first_major}.{first_minor} to {last_major}.{last_minor}"


def install_command(extra: str) -> str:
    return f"pip install 'lococo[{extra}]'"


class MissingExtraError(ModuleNotFoundError):
    """A module of an optional part of lococo is not installed; the message names the extra that brings it."""

    def __init__(self, feature: str, module: str, extra: str):
        self.feature, self.extra = feature, extra
        super().__init__(f"{feature} needs the '{extra}' extra of lococo: {module!r} is not installed. Install it "
                         f"with: {install_command(extra)} (from a wheel file: pip install '<the .whl file>[{extra}]')",
                         name=module)


def missing_extra(exc: ImportError, feature: str, extra: str | None = None) -> MissingExtraError | None:
    """The error naming the extra for ``exc``, when ``exc`` is a module of an extra not being installed.

    ``extra``: the extra to name (default: the one that brings the missing module). None when the
    missing module is not one that an extra brings (a bug or a broken install, to be raised as is).
    """
    if isinstance(exc, MissingExtraError) and extra in (None, exc.extra):
        return exc
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    module = exc.name.partition(".")[0]
    if module not in MODULE_EXTRA:
        return None
    return MissingExtraError(feature, module, extra or MODULE_EXTRA[module])


def require(module: str, feature: str, extra: str | None = None):
    """``import module``, or MissingExtraError naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        error = missing_extra(exc, feature, extra)
        if error is None:
            raise
        raise error from exc


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, without importing it (None when absent)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
