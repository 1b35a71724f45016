"""The asset folder: where assets live, the markers that say an asset is complete, and the errors.

An asset counts as present only when the marker written after its last step exists and the
files it lists have their recorded sizes, so an interrupted fetch is simply redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

FETCH_COMMAND = "python -m lococo assets fetch"
CACHE_ENV = "LOCOCO_CACHE"
MARKER = ".complete.json"


class AssetError(RuntimeError):
    """A fetch step failed (after its retries), or an asset does not match its checksum."""


class AssetMissingError(AssetError, FileNotFoundError):
    """An asset is not in the cache; the message names the command that fetches it."""

    def __init__(self, what: str, cache: Path, extra: str = ""):
        only = f" --only {extra}" if extra else ""
        super().__init__(
            f"{what} is not in the lococo cache {cache}. Fetch it with `{FETCH_COMMAND}{only}` "
            f"(set {CACHE_ENV} or pass --assets-dir to use another folder).")


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else $LOCOCO_CACHE, else ~/.cache/lococo."""
    if cache is None:
        cache = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lococo"
    return Path(cache).expanduser().resolve()


def shared_path(path: str | os.PathLike) -> str:
    """``path`` as a record meant to be shared writes it: the home folder as ~."""
    text, home = str(path), str(Path.home())
    return "~" + text[len(home):] if text == home or text.startswith(home + os.sep) else text


def log(message: str) -> None:
    print(f"[lococo assets] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(step: str, timings: dict[str, float] | None) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[step] = round(seconds, 2)
    log(f"{step}: {seconds:.1f} s")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def damaged_files(folder: Path, files: dict[str, dict], full: bool) -> list[str]:
    """Names of the listed files that are missing or differ (size; SHA-256 when full)."""
    bad = []
    for name, info in files.items():
        path = folder / name
        try:
            if path.stat().st_size != info["size"]:
                bad.append(name)
            elif full and sha256_file(path) != info["sha256"]:
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad


def file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def publish(staging: Path, final: Path, marker: dict) -> None:
    """Write the marker into the finished staging folder, then move it into place."""
    (staging / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)


def staging_folder(cache: Path, name: str) -> Path:
    folder = cache / "tmp" / f"{name}.{os.getpid()}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
