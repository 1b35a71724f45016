"""Documents out of an archive: the members a source wants, decoded and normalised, inside the folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import registry
from .html_text import html_to_text
from .store import AssetError, file_entry

if TYPE_CHECKING:
    from .text import TextSource


def decode_text(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def safe_member_path(archive: Path, name: str, rel: str) -> str:
    """``rel`` when it stays inside the extraction folder; an AssetError for absolute or ``..`` paths."""
    parts = Path(rel).parts
    if Path(rel).is_absolute() or Path(name).is_absolute() or ".." in parts or ".." in Path(name).parts:
        raise AssetError(f"{archive.name}: member {name!r} points outside the extraction folder; the "
                         "archive is not what was pinned")
    return rel


def extract_documents(source: TextSource, archive: Path, into: Path) -> dict[str, dict]:
    files: dict[str, dict] = {}
    with registry.open_archive(source, archive) as tar:
        for member in tar:
            rel = source.wants(member.name) if member.isfile() else None
            if rel is None:
                continue
            rel = safe_member_path(archive, member.name, rel)
            raw = tar.extractfile(member).read()
            text = decode_text(raw)
            if source.html:
                text = html_to_text(text)
            path = into / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            files[rel] = file_entry(path)
    if not files:
        raise AssetError(f"{archive.name} has no file under {source.prefix} matching "
                         f"{source.include}: the package layout changed")
    return files
