"""The learned part of LoCoCo: one convolution plus a blend scalar per decoder layer."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ADDED_FIELDS, LoCoCoConfig
from .ops import fuse_kv

__all__ = ["LayerCompressor", "LoCoCoCompressor", "ModelGeometry", "WindowedLayer", "read_compressor_config"]

CONFIG_FILE = "lococo_config.json"
WEIGHTS_FILE = "lococo_compressor.safetensors"
# 2: config.num_slots may be a list (per-layer budgets). Version 1 files (one int M) still load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# compressors shipped with the package, loadable by folder name: from_pretrained("smollm2-135m-m128")
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


class LayerCompressor(nn.Module):
    """Conv1d(2d -> C, kernel k, "same" zero padding, bias) and the scalar alpha of one layer.

    Shared by all KV heads of the layer. Initialisation follows the original code: weight
    ~ N(0, init_std), bias 0, alpha = alpha_init (not clamped).
    """

    def __init__(self, head_dim: int, num_fused: int, kernel_size: int = 21,
                 init_std: float = 1.0, alpha_init: float = 0.5, bias: bool = True,
                 slot_bias: bool = False, device=None, dtype=None):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if head_dim < 1 or num_fused < 0:
            raise ValueError(f"head_dim must be >= 1 and num_fused >= 0, got {head_dim}, {num_fused}")
        factory = {"device": device, "dtype": dtype}
        self.head_dim, self.num_fused, self.kernel_size = head_dim, num_fused, kernel_size
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_fused, 2 * head_dim, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(num_fused, **factory)) if bias else None
        self.alpha = nn.Parameter(torch.full((), float(alpha_init), **factory))
        # the attention logit of each fused slot (LoCoCoConfig.slot_bias); not an input of fuse_kv
        self.slot_logit = nn.Parameter(torch.zeros(num_fused, **factory)) if slot_bias else None
        self.reset_parameters(alpha_init)

    def reset_parameters(self, alpha_init: float = 0.5) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)
            if self.bias is not None:
                self.bias.zero_()
            if self.slot_logit is not None:
                self.slot_logit.zero_()
            self.alpha.fill_(alpha_init)

    def forward(self, mem_k, mem_v, new_k, new_v, scores, num_heavy: int, num_local: int = 0,
                valid_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress [mem ; new] into num_heavy + C slots (see ``lococo.fuse_kv``).

        The parameters are cast to the cache's device and dtype; gradients flow back to them in
        theirs.
        """
        cast = {"device": mem_k.device, "dtype": mem_k.dtype}
        bias = None if self.bias is None else self.bias.to(**cast)
        return fuse_kv(mem_k, mem_v, new_k, new_v, scores, self.weight.to(**cast), bias,
                       self.alpha.to(**cast), num_heavy, num_local, valid_len)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_fused={self.num_fused}, kernel_size={self.kernel_size}, "
                f"bias={self.bias is not None}, slot_bias={self.slot_logit is not None}")


def windowed_layers(config, num_layers: int) -> tuple[tuple[int, ...], int | None]:
    """(sliding-window layers, window) of a decoder config that mixes them with full-attention layers, else ((), None).

    Read from ``config.layer_types`` (transformers 5: "sliding_attention" / "full_attention"). A model whose
    every layer is windowed (Mistral's ``sliding_window``) has none here: its layers are all compressed, and the
    window must exceed what a layer stores (``apply_lococo`` checks it).
    """
    layer_types = list(getattr(config, "layer_types", None) or [])
    if len(layer_types) != num_layers:
        return (), None
    windowed = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    if not windowed or len(windowed) == num_layers:
        return (), None
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window < 1:
        raise TypeError(f"{type(config).__name__} has sliding-window layers {list(windowed)} but no sliding_window")
    return windowed, int(window)


class WindowedLayer(nn.Module):
    """The place of a sliding-window layer in a ``LoCoCoCompressor``: transformers' window cache keeps that layer's
    entries (docs/design.md#sliding-window-layers), so there is nothing to learn and no parameter."""

    num_fused = 0

    def forward(self, *args, **kwargs):
        raise RuntimeError("a sliding-window layer is not compressed: its cache is transformers' window")


@dataclass(frozen=True)
class ModelGeometry:
    """What a compressor must agree on with the model it compresses."""

    model_type: str
    num_layers: int
    head_dim: int
    num_kv_heads: int
    # Models that mix sliding-window and full-attention layers (Gemma 3, Qwen3 with use_sliding_window): the
    # sliding-window layers, which keep transformers' own window cache (docs/design.md#sliding-window-layers),
    # and their window. Empty when every layer is full attention, or when every layer is windowed (Mistral).
    windowed_layers: tuple[int, ...] = ()
    sliding_window: int | None = None

    @classmethod
    def of(cls, model_or_config) -> ModelGeometry:
        """Reads the geometry of a transformers model or config (its decoder text config)."""
        config = getattr(model_or_config, "config", model_or_config)
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        try:
            num_heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
            num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
            num_layers = int(config.num_hidden_layers)
        except AttributeError as exc:
            raise TypeError(f"cannot read the attention geometry of {type(config).__name__}: {exc}") from exc
        windowed, window = windowed_layers(config, num_layers)
        return cls(str(getattr(config, "model_type", "")), num_layers, int(head_dim), int(num_kv_heads),
                   windowed, window)

    @property
    def compressed_layers(self) -> list[int]:
        """The decoder layers a fixed-slot cache compresses: all but the sliding-window layers of a mixed model."""
        return [i for i in range(self.num_layers) if i not in self.windowed_layers]

    def to_dict(self) -> dict:
        """The fields ``save_pretrained`` records (the window fields only for a mixed model)."""
        data = {"model_type": self.model_type, "num_layers": self.num_layers, "head_dim": self.head_dim,
                "num_kv_heads": self.num_kv_heads}
        if self.windowed_layers:
            data.update(windowed_layers=list(self.windowed_layers), sliding_window=self.sliding_window)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelGeometry:
        """The geometry recorded by ``save_pretrained``; ValueError naming the field that is wrong."""
        for name in ("model_type", "num_layers", "head_dim", "num_kv_heads"):
            if name not in data:
                raise ValueError(f"model.{name} is missing")
        if not isinstance(data["model_type"], str):
            raise ValueError(f"model.model_type must be a string, got {data['model_type']!r}")
        for name in ("num_layers", "head_dim", "num_kv_heads"):
            value = data[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        unknown = sorted(set(data) - {"model_type", "num_layers", "head_dim", "num_kv_heads", "windowed_layers",
                                      "sliding_window"})
        if unknown:
            raise ValueError(f"model has unknown fields {unknown}")
        windowed = data.get("windowed_layers", [])
        if not (isinstance(windowed, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                   and 0 <= i < data["num_layers"] for i in windowed)
                and all(a < b for a, b in zip(windowed, windowed[1:]))):
            raise ValueError("model.windowed_layers must be increasing layer indices below num_layers, got "
                             f"{windowed!r}")
        if len(windowed) == data["num_layers"]:
            raise ValueError("model.windowed_layers covers every layer: nothing would be compressed")
        window = data.get("sliding_window")
        if windowed and not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
            raise ValueError(f"model.sliding_window must be a positive integer with windowed_layers, got {window!r}")
        return cls(data["model_type"], data["num_layers"], data["head_dim"], data["num_kv_heads"], tuple(windowed),
                   window if windowed else None)

    def differences(self, other: ModelGeometry) -> list[str]:
        """The shape-relevant fields that differ, in words (model_type and KV heads excluded)."""
        out = []
        if self.num_layers != other.num_layers:
            out.append(f"{self.num_layers} decoder layers vs {other.num_layers}")
        if self.head_dim != other.head_dim:
            out.append(f"head_dim {self.head_dim} vs {other.head_dim}")
        if self.windowed_layers != other.windowed_layers:
            out.append(f"sliding-window layers {list(self.windowed_layers)} vs {list(other.windowed_layers)}")
        return out

    def require_fit(self, model_or_config, subject: str) -> ModelGeometry:
        """The model's geometry; raises ValueError saying what differs when ``subject`` does not fit it."""
        theirs = ModelGeometry.of(model_or_config)
        diff = self.differences(theirs)
        if diff:
            raise ValueError(
                f"{subject} was built for {self.model_type or 'a model'} with {self.num_layers} layers and "
                f"head_dim {self.head_dim}; the model ({theirs.model_type}) differs: {'; '.join(diff)}")
        return theirs


def compressor_folder(path: str | Path) -> Path:
    """``path`` itself, or the shipped compressor of that name (``"smollm2-135m-m128"``) when no such path exists."""
    path = Path(path)
    if not path.exists() and (PRETRAINED_DIR / path / CONFIG_FILE).is_file():
        return PRETRAINED_DIR / path
    return path


def _missing(path: Path) -> FileNotFoundError:
    shipped = ", ".join(LoCoCoCompressor.pretrained_names())
    return FileNotFoundError(f"{path} must hold {CONFIG_FILE} and {WEIGHTS_FILE} (written by save_pretrained), "
                             f"or be the name of a shipped compressor ({shipped})")


def read_compressor_config(path: str | Path) -> tuple[LoCoCoConfig, ModelGeometry]:
    """The config and geometry in a compressor folder's lococo_config.json, checked field by field.

    Every error is a ValueError (FileNotFoundError when the file is absent) naming the file and
    the field; no field is filled in with a default.
    """
    file = compressor_folder(path) / CONFIG_FILE
    if not file.is_file():
        raise _missing(Path(path))
    try:
        meta = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object with format_version, config and model, got a "
                         f"{type(meta).__name__}")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{file}: format_version {meta.get('format_version')!r} is not supported (this lococo "
                         f"reads {', '.join(map(str, READABLE_VERSIONS))})")
    if meta["format_version"] == 1 and isinstance(meta.get("config"), dict) and isinstance(
            meta["config"].get("num_slots"), list):
        raise ValueError(f"{file}: config.num_slots is a list, which format_version 1 cannot hold (per-layer "
                         "budgets need format_version 2)")
    for key in ("config", "model"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"{file}: field {key} is missing or not a JSON object")
    missing = [name for name in LoCoCoConfig.field_names() if name not in meta["config"] and name not in ADDED_FIELDS]
    if missing:
        raise ValueError(f"{file}: field{'s' if len(missing) > 1 else ''} "
                         f"{', '.join('config.' + name for name in missing)} missing")
    try:
        config = LoCoCoConfig.from_dict(meta["config"])
        geometry = ModelGeometry.from_dict(meta["model"])
        config.slots_per_layer(geometry.num_layers)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{file}: {str(exc).replace('LoCoCoConfig: ', 'config: ')}") from None
    if (file.parent / WEIGHTS_FILE).is_file():
        check_weights(file.parent, config, geometry)
    return config, geometry


def check_weights(path: str | Path, config: LoCoCoConfig, geometry: ModelGeometry) -> None:
    """The weights file's header against the config: every tensor there, of its shape and a float dtype.

    Reads only the header (cheap), so that commands can check a compressor before any model loads;
    ValueError naming the file and the tensor.
    """
    from safetensors import safe_open

    file = compressor_folder(path) / WEIGHTS_FILE
    if not file.is_file():
        raise _missing(Path(path))
    try:
        with safe_open(str(file), framework="pt") as handle:
            got = {name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                   for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types, without the file's name
        raise ValueError(f"{file}: not a readable safetensors file ({exc})") from None
    empty = LoCoCoCompressor(config, geometry, device="meta")
    expected = {name: tuple(t.shape) for name, t in empty.state_dict().items()}
    problems = [f"missing {name}" for name in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected {name}" for name in sorted(got.keys() - expected.keys())]
    problems += [f"{name} has shape {got[name][0]}, the config implies {expected[name]}"
                 for name in sorted(expected.keys() & got.keys()) if got[name][0] != expected[name]]
    problems += [f"{name} is {got[name][1]}, not a floating-point dtype (F16, BF16, F32, F64)"
                 for name in sorted(expected.keys() & got.keys()) if got[name][1] not in ("F16", "BF16", "F32", "F64")]
    if problems:
        raise ValueError(f"{file} does not match {CONFIG_FILE}: " + "; ".join(problems))


class LoCoCoCompressor(nn.Module):
    """One ``LayerCompressor`` per decoder layer of a model, with its ``LoCoCoConfig``.

    Build it with ``LoCoCoCompressor.for_model(model, config)``; save and load it with
    ``save_pretrained`` / ``from_pretrained`` (a folder with ``lococo_config.json`` and
    ``lococo_compressor.safetensors``). The parameters stay in their own dtype (float32 by default,
    for training) and are cast to the cache's dtype and device when compressing.
    """

    def __init__(self, config: LoCoCoConfig, geometry: ModelGeometry, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, LoCoCoConfig):
            raise TypeError(f"config must be a LoCoCoConfig, got {type(config).__name__}")
        config.slots_per_layer(geometry.num_layers)  # per-layer budgets: one per decoder layer
        self.config = config
        self.geometry = geometry
        self.layers = nn.ModuleList(
            WindowedLayer() if i in geometry.windowed_layers else
            LayerCompressor(geometry.head_dim, config.layer(i).num_fused, config.kernel_size, config.init_std,
                            config.alpha_init, slot_bias=config.slot_bias, device=device, dtype=dtype)
            for i in range(geometry.num_layers))

    @classmethod
    def for_model(cls, model_or_config, config: LoCoCoConfig | None = None, device=None,
                  dtype=torch.float32, **config_fields) -> LoCoCoCompressor:
        """A freshly initialised, untrained compressor for this model (or config): train it before use.

        An untrained compressor mixes entries at random; for inference load a trained one with
        ``from_pretrained`` (``pretrained_names()`` lists those shipped with lococo).

        ``config_fields`` build the ``LoCoCoConfig`` when ``config`` is not given; their ``num_slots`` may be
        one M per layer: a list, a ``lococo.Budgets`` or a budget file (path or shipped name). Instead of
        ``num_slots`` the budget may be ``compression_ratio`` (with ``context_length``, default the model's
        positions) or ``kv_tokens`` (see ``lococo.budgets.slots_for_budget``). The device defaults to the model's.
        """
        budget = {k: config_fields.pop(k) for k in ("compression_ratio", "context_length", "kv_tokens")
                  if k in config_fields}
        if budget:
            from .budgets import slots_for_budget

            if config is not None:
                raise TypeError("give either a LoCoCoConfig or its fields (with a budget), not both")
            beta = config_fields.get("beta", LoCoCoConfig.beta)
            config_fields["num_slots"] = slots_for_budget(config_fields.get("num_slots"), beta=beta,
                                                          model=model_or_config, **budget)
        if config is None:
            if isinstance(config_fields.get("num_slots"), (str, Path)):  # a budget file or a shipped name
                from .budgets import per_layer_slots

                num_layers = ModelGeometry.of(model_or_config).num_layers
                config_fields["num_slots"] = per_layer_slots(config_fields["num_slots"], num_layers)
            config = LoCoCoConfig(**config_fields)
        elif config_fields:
            raise TypeError("give either a LoCoCoConfig or its fields, not both")
        if device is None and isinstance(model_or_config, nn.Module):
            device = next(model_or_config.parameters()).device
        return cls(config, ModelGeometry.of(model_or_config), device=device, dtype=dtype)

    def __getitem__(self, layer_idx: int) -> LayerCompressor:
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)

    def needs_scores(self) -> bool:
        """False only for pure convolution (no heavy hitters and alpha = 1 in every layer)."""
        compressed = self.compressed_layers()
        if any(self.config.layer(i).num_heavy > 0 for i in compressed):
            return True
        return any(float(self.layers[i].alpha.detach()) != 1.0 for i in compressed)

    def compressed_layers(self) -> list[int]:
        """The decoder layers this compressor compresses: every one except a mixed model's sliding-window layers."""
        return self.geometry.compressed_layers

    def check_model(self, model_or_config) -> None:
        """Raises ValueError saying what differs when this compressor does not fit the model."""
        self.geometry.require_fit(model_or_config, "this LoCoCo compressor")

    def save_pretrained(self, path: str | Path, *, model_card: bool = False, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict | None = None,
                        **push_to_hub_kwargs) -> str | None:
        """Saves the compressor into the folder ``path``, as ``ModelHubMixin.save_pretrained`` does a model.

        Writes lococo_config.json and lococo_compressor.safetensors. With ``model_card=True``, or
        ``model_card_kwargs``, or ``push_to_hub=True``, also the model card README.md (unless the folder
        has one), made by huggingface_hub (the ``hf`` extra): the config summarised, the model it was
        built for, how to load it. ``model_card_kwargs`` fill or override the card's fields, e.g.
        ``{"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}``. With ``push_to_hub=True`` it then
        uploads the compressor to the Hub repo ``repo_id`` (default: the folder's name), as
        ``push_to_hub``, and returns the commit's URL.
        """
        from . import hub

        return hub.save_pretrained(self, path, model_card=model_card, repo_id=repo_id, push_to_hub=push_to_hub,
                                   model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Uploads the compressor and its model card to the Hub repo ``repo_id`` (``"user/repo"``) in one commit.

        ``ModelHubMixin.push_to_hub`` itself: the keywords are its own (``commit_message``, ``private``,
        ``token``, ``branch``, ``create_pr``, ``allow_patterns``, ``ignore_patterns``, ``delete_patterns``,
        ``model_card_kwargs``). Returns the URL of the commit.
        """
        from . import hub

        return hub.push(self, repo_id, **kwargs)

    def _save_pretrained(self, path: str | Path) -> None:
        """The ``ModelHubMixin`` hook: writes lococo_config.json and lococo_compressor.safetensors into ``path``."""
        from safetensors.torch import save_file

        from ._version import __version__

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "lococo_version": __version__,
                "config": self.config.to_dict(), "model": self.geometry.to_dict()}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, model=None, device=None, dtype=None, *, revision: str | None = None,
                        cache_dir: str | Path | None = None, force_download: bool = False,
                        local_files_only: bool = False, token: str | bool | None = None) -> LoCoCoCompressor:
        """Loads a compressor saved by ``save_pretrained``: from a folder, a shipped name or a Hub repo.

        ``path``: a folder; else the name of a shipped compressor (``pretrained_names()``:
        ``"smollm2-135m-m128"``, ...); else a Hugging Face Hub repo id (``"user/repo"``), whose
        lococo_config.json and lococo_compressor.safetensors are downloaded into the Hub cache as
        ``ModelHubMixin.from_pretrained`` does, with its keywords (``revision``, ``cache_dir``,
        ``force_download``, ``local_files_only``, ``token``; ``HF_HUB_OFFLINE=1`` reads the cache only).
        A folder or shipped name never touches the network.

        With ``model`` (a model or its config), checks that the compressor fits it and raises a
        ValueError saying what differs; the device then defaults to the model's.
        """
        # Not ModelHubMixin.from_pretrained, which would first fetch config.json and pass it to __init__: a
        # compressor has none (lococo_config.json is read and checked instead). Straight to the mixin's hook.
        return cls._from_pretrained(model_id=path, revision=revision, cache_dir=cache_dir,
                                    force_download=force_download, local_files_only=local_files_only, token=token,
                                    model=model, device=device, dtype=dtype)

    @classmethod
    def _from_pretrained(cls, *, model_id: str | Path, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None, model=None,
                         device=None, dtype=None) -> LoCoCoCompressor:
        """The ``ModelHubMixin`` hook: finds the folder (local, shipped or downloaded), then reads and checks it."""
        from safetensors.torch import load_file

        path = compressor_folder(model_id)
        if not path.exists() and isinstance(model_id, str):
            from . import hub

            if hub.is_repo_id(model_id):
                path = hub.download(model_id, (CONFIG_FILE, WEIGHTS_FILE), revision=revision, cache_dir=cache_dir,
                                    force_download=force_download, local_files_only=local_files_only, token=token)
        if not (path / WEIGHTS_FILE).is_file():
            raise _missing(path)
        config, geometry = read_compressor_config(path)
        if model is not None:
            theirs = geometry.require_fit(model, f"the compressor in {path}")
            if theirs.model_type != geometry.model_type:
                warnings.warn(f"the compressor in {path} was trained on a {geometry.model_type} model and is "
                              f"loaded for a {theirs.model_type} model of the same shapes", stacklevel=3)
            if device is None and isinstance(model, nn.Module):
                device = next(model.parameters()).device
        check_weights(path, config, geometry)
        try:
            state = load_file(str(path / WEIGHTS_FILE))
        except Exception as exc:  # safetensors raises its own error types, without the file's name
            raise ValueError(f"{path / WEIGHTS_FILE}: not a readable safetensors file ({exc})") from None
        bad = sorted(name for name, t in state.items() if not torch.isfinite(t).all())
        if bad:
            raise ValueError(f"{path / WEIGHTS_FILE}: " + "; ".join(f"{name} holds NaN or infinite values"
                                                                     for name in bad))
        compressor = cls(config, geometry, device="meta")
        compressor.load_state_dict(state, assign=True)
        return compressor.to(device=device, dtype=dtype)

    @staticmethod
    def pretrained_names() -> list[str]:
        """The compressors shipped with the package, by the name ``from_pretrained`` takes."""
        return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / CONFIG_FILE).is_file())

    def extra_repr(self) -> str:
        c = self.config
        if c.per_layer:
            slots = f"M={min(c.num_slots)}..{max(c.num_slots)} (per layer, {sum(c.num_slots)} in all), rho={c.rho}"
        else:
            slots = f"M={c.num_slots}, H={c.num_heavy}, C={c.num_fused}"
        return f"{slots}, beta={c.beta}, k={c.kernel_size}, l={c.num_local}, model={self.geometry.model_type}"
