"""A LoCoCoCompressor on the Hugging Face Hub, the way huggingface_hub's ``ModelHubMixin`` does it.

``LoCoCoCompressor.save_pretrained(folder)``, ``from_pretrained(folder, shipped name or "user/repo")`` and
``push_to_hub("user/repo")`` behave as they do for a ``ModelHubMixin`` model: the compressor implements the
mixin's hooks (``_save_pretrained``, ``_from_pretrained``), ``push_to_hub`` is the mixin's own, and the model
card (README.md) comes from the mixin's card machinery with lococo's template. Two differences:
``save_pretrained`` writes the card on request (``model_card=True``; ``push_to_hub`` always does), and
``from_pretrained`` reads no ``config.json`` (see ``save_pretrained`` below and
``LoCoCoCompressor.from_pretrained``).

The compressor does not inherit ``ModelHubMixin``; a subclass of it, made on first use, wraps the compressor
(``hub_model``). huggingface_hub is imported only when one of these needs it, never by ``import lococo``:

- ``import lococo`` needs only torch; huggingface_hub comes with transformers (the ``hf`` extra);
- importing huggingface_hub fixes its offline switch from ``HF_HUB_OFFLINE`` at that moment, and the
  ``lococo`` commands set ``HF_HUB_OFFLINE=1`` when they start, after ``import lococo``.

Without huggingface_hub, ``save_pretrained`` writes the compressor's two files and ``from_pretrained`` loads
folders and shipped names; the card, a Hub repo id and ``push_to_hub`` raise ``MissingExtraError`` naming
the ``hf`` extra.

A string of the form ``"user/repo"`` that is no folder is a repo id; a ``Path`` is always a folder.

On disk a compressor is ``lococo_config.json`` and ``lococo_compressor.safetensors`` (``lococo.compressor``),
and README.md when its card is written. The mixin writes a ``config.json`` only for a model whose
``__init__`` arguments are JSON values; the wrapper's argument is the compressor, so no ``config.json`` is
written (nor read): the config is in ``lococo_config.json`` alone.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from .extras import MissingExtraError

__all__ = ["CARD_FILE", "LIBRARY_NAME", "PAPER_URL", "TAGS", "card_kwargs", "download", "hub_model", "import_hub",
           "is_repo_id", "push", "save_pretrained"]

LIBRARY_NAME = "lococo"
TAGS = ["lococo", "kv-cache", "kv-cache-compression"]      # the mixin adds "model_hub_mixin"
PAPER_URL = "https://arxiv.org/abs/2406.05317"
CARD_FILE = "README.md"

# Jinja template of the model card (huggingface_hub.ModelCard.from_template). The mixin passes card_data
# (library_name and tags, as YAML), paper_url, repo_url and docs_url; card_kwargs() the rest, and a
# save_pretrained/push_to_hub caller may add or override any of them with model_card_kwargs
# (base_model="HuggingFaceTB/SmolLM2-135M-Instruct", repo_id=..., ...).
MODEL_CARD_TEMPLATE = """---
# For reference on model card metadata, see the spec: https://github.com/huggingface/hub-docs/blob/main/modelcard.md?plain=1
# Doc / guide: https://huggingface.co/docs/hub/model-cards
{{ card_data }}
{%- if base_model %}
base_model: {{ base_model }}
{%- endif %}
---

# LoCoCo compressor{% if base_model %} for {{ base_model }}{% endif %}

A learned KV-cache compressor for the `lococo` library. LoCoCo ([Cai et al., ICML 2024]({{ paper_url }})) keeps
the KV cache of a causal LM at a fixed size: whenever a layer's cache overflows, one small convolution per
decoder layer scores the cached entries and fuses them into M slots.

`{{ summary }}`

## The model it was trained for

A `{{ model_type }}` model{% if base_model %} ([{{ base_model }}](https://huggingface.co/{{ base_model }})){% endif %}
with {{ num_layers }} decoder layers, head_dim {{ head_dim }} and {{ num_kv_heads }} KV heads{{ windowed }}.
`from_pretrained(..., model=model)` checks that a model has these shapes.

## Config

| field | value |
|---|---|
{% for name, value in config_fields -%}
| `{{ name }}` | `{{ value }}` |
{% endfor %}
{{ num_parameters }} parameters ({{ dtypes }}).

## Usage

```python
import lococo
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{{ base_model | default("<the " ~ model_type ~ " model>", true) }}")
compressor = lococo.LoCoCoCompressor.from_pretrained("{{ repo_id | default("<this repo>", true) }}", model=model)
lococo.apply_lococo(model, compressor)   # generate() now keeps a fixed-size LoCoCo cache
```

## Files

- `lococo_config.json`: the config above and the model's shapes (format_version {{ format_version }})
- `lococo_compressor.safetensors`: the weights

Saved with lococo {{ lococo_version }}.
"""

# "user/repo": a namespace and a name (letters, digits, '-', '_', '.'); checked in full by huggingface_hub
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_repo_id(name: str | Path) -> bool:
    """Whether ``name`` has the form of a Hub repo id, ``"user/repo"`` (whether or not such a folder exists)."""
    text = str(name)
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text


def import_hub(feature: str):
    """``import huggingface_hub``, or MissingExtraError naming the ``hf`` extra (which brings it with transformers)."""
    try:
        import huggingface_hub
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "huggingface_hub":
            raise
        raise MissingExtraError(feature, "huggingface_hub", "hf") from exc
    return huggingface_hub


@functools.cache
def _hub_model_class() -> type:
    from huggingface_hub import ModelHubMixin

    class LoCoCoCompressorHub(ModelHubMixin, library_name=LIBRARY_NAME, tags=list(TAGS), paper_url=PAPER_URL,
                              model_card_template=MODEL_CARD_TEMPLATE):
        """A ``LoCoCoCompressor`` as a ``ModelHubMixin`` model: the mixin's save_pretrained, push_to_hub and
        model card, over the compressor's ``_save_pretrained``."""

        def __init__(self, compressor):
            self.compressor = compressor

        def _save_pretrained(self, save_directory: Path) -> None:
            self.compressor._save_pretrained(save_directory)

    return LoCoCoCompressorHub


def hub_model(compressor, feature: str = "the Hugging Face Hub"):
    """``compressor`` wrapped in the ``ModelHubMixin`` subclass (MissingExtraError without huggingface_hub)."""
    import_hub(feature)
    return _hub_model_class()(compressor)


def card_kwargs(compressor, extra: dict | None = None) -> dict:
    """What the card template says about ``compressor``; ``extra`` (model_card_kwargs) adds or overrides."""
    from ._version import __version__
    from .compressor import FORMAT_VERSION

    geometry = compressor.geometry
    windowed = list(getattr(geometry, "windowed_layers", ()) or ())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in compressor.parameters()})
    fields = {
        "summary": compressor.extra_repr(),
        "model_type": geometry.model_type or "causal LM",
        "num_layers": geometry.num_layers,
        "head_dim": geometry.head_dim,
        "num_kv_heads": geometry.num_kv_heads,
        "windowed": (f"; sliding-window layers {windowed} (window {geometry.sliding_window}) keep transformers' "
                     "window cache" if windowed else ""),
        "config_fields": [(name, json.dumps(value)) for name, value in compressor.config.to_dict().items()],
        "num_parameters": f"{sum(p.numel() for p in compressor.parameters()):,}",
        "dtypes": ", ".join(dtypes) or "none",
        "format_version": FORMAT_VERSION,
        "lococo_version": __version__,
    }
    return {**fields, **(extra or {})}


def save_pretrained(compressor, path: str | Path, *, model_card: bool = False, repo_id: str | None = None,
                    push_to_hub: bool = False, model_card_kwargs: dict | None = None,
                    **push_to_hub_kwargs) -> str | None:
    """``ModelHubMixin.save_pretrained`` for a compressor: its files, the card (unless README.md exists), the push.

    The card is written on request (``model_card=True``, ``model_card_kwargs``, or ``push_to_hub=True``), not by
    default as the mixin does: the ``lococo`` commands save compressors into run folders and checkpoints whose
    files they list (``recipes.run_folder.RUN_FILES``, ``recipes.distill.CHECKPOINT_FILES``), without README.md.
    The mixin's own ``save_pretrained`` also deletes any ``config.json`` in the folder (to rewrite it from the
    model's config); a compressor is often saved beside a model, whose ``config.json`` that would be, and has no
    ``config.json`` of its own: so the steps are taken here, with the mixin's card and its ``push_to_hub``.
    """
    model_card = model_card or push_to_hub or model_card_kwargs is not None
    if model_card:      # before anything is written
        import_hub("the model card of LoCoCoCompressor.save_pretrained")
    path = Path(path)
    compressor._save_pretrained(path)
    card = path / CARD_FILE
    if model_card and not card.exists():   # as the mixin: a card already there is kept
        hub_model(compressor).generate_model_card(**card_kwargs(compressor, model_card_kwargs)).save(card)
    if push_to_hub:
        return push(compressor, repo_id or path.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
    return None


def push(compressor, repo_id: str, *, model_card_kwargs: dict | None = None, **kwargs) -> str:
    """``ModelHubMixin.push_to_hub``: saves the compressor and its card into a temporary folder and uploads it."""
    model = hub_model(compressor, "LoCoCoCompressor.push_to_hub")
    card = {"repo_id": repo_id, **(model_card_kwargs or {})}
    return model.push_to_hub(repo_id, model_card_kwargs=card_kwargs(compressor, card), **kwargs)


def download(repo_id: str, files: tuple[str, ...], *, revision: str | None = None, cache_dir=None,
             force_download: bool = False, local_files_only: bool = False, token=None) -> Path:
    """The folder in the Hub cache holding ``files`` of the repo ``repo_id`` at ``revision`` (one commit).

    ``snapshot_download`` of those files only, so that it honours ``HF_HUB_OFFLINE``, ``cache_dir``,
    ``local_files_only``, ``force_download`` and ``token`` as every Hub download does. A repo, revision or file
    that cannot be found (on the Hub, or in the cache when offline) is a FileNotFoundError naming it.
    """
    from ._version import __version__

    hub = import_hub(f"loading {repo_id!r} from the Hugging Face Hub (there is no folder of that name here)")
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = Path(hub.snapshot_download(
            repo_id, allow_patterns=list(files), revision=revision, cache_dir=cache_dir,
            force_download=force_download, local_files_only=local_files_only, token=token,
            library_name=LIBRARY_NAME, library_version=__version__))
    except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"{repo_id}: no folder of that name here, and the Hugging Face Hub repo {repo_id}{at} "
                                f"could not be read ({type(exc).__name__}: {reason})") from exc
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the Hugging Face Hub repo {repo_id}{at} must hold {' and '.join(files)} (written "
                                f"by save_pretrained or push_to_hub); it has no {' and no '.join(missing)}")
    return folder
