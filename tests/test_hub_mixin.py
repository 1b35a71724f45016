"""LoCoCoCompressor on the Hugging Face Hub the ModelHubMixin way: save_pretrained with a model card,
from_pretrained of a folder, a shipped name or a repo id (from the Hub cache, offline), push_to_hub.
No test touches the network: the Hub cache is written by hand, and HfApi's calls are replaced."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

huggingface_hub = pytest.importorskip("huggingface_hub")

import lococo  # noqa: E402
from lococo.compressor import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402

from hf_models import tiny_compressor, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPO = "someone/tiny-compressor"
FILES = {CONFIG_FILE, WEIGHTS_FILE, "README.md"}


@pytest.fixture
def no_network(monkeypatch):
    """Any connection or name lookup fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network used: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def compressor(seed: int = 0) -> lococo.LoCoCoCompressor:
    made = tiny_compressor(tiny_model(), seed=seed)
    with torch.no_grad():
        made[1].alpha.fill_(0.25)
    return made


def same(a: lococo.LoCoCoCompressor, b: lococo.LoCoCoCompressor) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return a.config == b.config and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def into_hub_cache(cache: Path, repo_id: str, commit: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> None:
    """``folder``'s compressor files as the snapshot ``commit`` of ``repo_id`` in a Hub cache, named by ``refs``."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(folder / name, snapshot / name)
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


def test_save_pretrained_then_from_pretrained_round_trip(tmp_path, no_network):
    model = tiny_model()
    saved = compressor(seed=3)
    assert saved.save_pretrained(tmp_path / "c") is None
    assert {p.name for p in (tmp_path / "c").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}   # the format, as before
    assert saved.save_pretrained(tmp_path / "carded", model_card=True) is None
    assert {p.name for p in (tmp_path / "carded").iterdir()} == FILES      # and the card; no config.json
    for path in (tmp_path / "c", str(tmp_path / "c"), str(tmp_path / "carded")):
        loaded = lococo.LoCoCoCompressor.from_pretrained(path, model=model)
        assert same(saved, loaded) and loaded.geometry == saved.geometry
    meta = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())
    assert meta["format_version"] == 2 and meta["config"]["num_slots"] == 12 and meta["model"]["num_layers"] == 2


def test_the_card_names_the_library_the_config_and_the_model(tmp_path):
    saved = compressor()
    saved.save_pretrained(tmp_path / "c", model_card_kwargs={"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    card = huggingface_hub.ModelCard.load(tmp_path / "c" / "README.md")
    assert card.data.library_name == "lococo"
    assert {"lococo", "kv-cache", "model_hub_mixin"} <= set(card.data.tags)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert saved.extra_repr() in card.text                              # M=12, H=6, C=6, beta=3, k=5, ...
    assert "| `num_slots` | `12` |" in card.text and "| `kernel_size` | `5` |" in card.text
    assert "A `llama` model" in card.text and "2 decoder layers, head_dim 16 and 2 KV heads" in card.text
    assert "arxiv.org/abs/2406.05317" in card.text

    (tmp_path / "c" / "README.md").write_text("my own card\n")           # as the mixin: a card there is kept
    saved.save_pretrained(tmp_path / "c", model_card=True)
    assert (tmp_path / "c" / "README.md").read_text() == "my own card\n"
    saved.save_pretrained(tmp_path / "d", model_card=True)
    assert "| `num_slots` | `12` |" in (tmp_path / "d" / "README.md").read_text()


def test_saving_beside_a_model_keeps_its_config_json(tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "config.json").read_bytes()
    compressor().save_pretrained(tmp_path / "m", model_card=True)
    assert (tmp_path / "m" / "README.md").is_file()
    assert (tmp_path / "m" / "config.json").read_bytes() == before


def test_a_repo_id_loads_from_the_hub_cache_with_hf_hub_offline(tmp_path):
    saved = compressor(seed=5)
    saved.save_pretrained(tmp_path / "c")
    into_hub_cache(tmp_path / "cache", REPO, "a" * 40, tmp_path / "c")
    code = f"""
import json, socket, sys, torch
def refuse(*args, **kwargs):
    raise AssertionError("network used")
socket.socket.connect = refuse
socket.getaddrinfo = refuse
import lococo, huggingface_hub.constants
assert huggingface_hub.constants.HF_HUB_OFFLINE
c = lococo.LoCoCoCompressor.from_pretrained({REPO!r}, cache_dir={str(tmp_path / "cache")!r})
torch.save(c.state_dict(), {str(tmp_path / "state.pt")!r})
try:
    lococo.LoCoCoCompressor.from_pretrained("someone/not-cached", cache_dir={str(tmp_path / "cache")!r})
except FileNotFoundError as exc:
    print(exc)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    state = torch.load(tmp_path / "state.pt")
    assert state.keys() == saved.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in saved.state_dict().items())
    assert "someone/not-cached: no folder of that name here, and the Hugging Face Hub repo someone/not-cached " \
           "could not be read (LocalEntryNotFoundError" in done.stdout


def test_revision_and_local_files_only_pick_the_snapshot(tmp_path, no_network):
    first, second = compressor(seed=1), compressor(seed=2)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    cache = tmp_path / "cache"
    into_hub_cache(cache, REPO, "1" * 40, tmp_path / "first", refs=("main",))
    into_hub_cache(cache, REPO, "2" * 40, tmp_path / "second", refs=("v2",))
    load = lococo.LoCoCoCompressor.from_pretrained
    assert same(load(REPO, cache_dir=cache, local_files_only=True), first)
    assert same(load(REPO, cache_dir=cache, local_files_only=True, revision="v2"), second)
    assert same(load(REPO, cache_dir=str(cache), local_files_only=True, revision="2" * 40), second)
    with pytest.raises(FileNotFoundError, match=rf"{REPO} at revision 'v3' could not be read"):
        load(REPO, cache_dir=cache, local_files_only=True, revision="v3")


@pytest.fixture
def fake_snapshot_download(monkeypatch, tmp_path):
    """huggingface_hub.snapshot_download replaced: records its calls and returns tmp_path / "snapshot"."""
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_repo_id_is_downloaded_with_the_hub_arguments(tmp_path, fake_snapshot_download, no_network):
    saved = compressor(seed=7)
    saved.save_pretrained(tmp_path / "snapshot")
    loaded = lococo.LoCoCoCompressor.from_pretrained(REPO, revision="v1", cache_dir=tmp_path / "cache",
                                                     force_download=True, token="hf_x", dtype=torch.float64)
    assert same(saved.double(), loaded) and loaded[0].weight.dtype == torch.float64
    [call] = fake_snapshot_download
    assert call["repo_id"] == REPO and sorted(call["allow_patterns"]) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert (call["revision"], call["cache_dir"], call["force_download"], call["token"]) == (
        "v1", tmp_path / "cache", True, "hf_x")
    assert call["local_files_only"] is False and call["library_name"] == "lococo"


def test_folders_and_shipped_names_never_reach_the_hub(tmp_path, monkeypatch, fake_snapshot_download, no_network):
    compressor().save_pretrained(tmp_path / "user" / "repo")
    monkeypatch.chdir(tmp_path)                      # "user/repo" is a relative folder here: it wins over the Hub
    lococo.LoCoCoCompressor.from_pretrained("user/repo")
    shipped = lococo.LoCoCoCompressor.from_pretrained("smollm2-135m-m128")
    assert shipped.geometry.num_layers == 30 and shipped.config.num_slots == 128
    with pytest.raises(FileNotFoundError, match="must hold lococo_config.json and lococo_compressor.safetensors"):
        lococo.LoCoCoCompressor.from_pretrained("no-such-compressor")      # a name without '/': no Hub look-up
    with pytest.raises(FileNotFoundError, match="must hold lococo_config.json"):
        lococo.LoCoCoCompressor.from_pretrained(Path("user/nowhere"))       # a Path is a path, never a repo id
    assert fake_snapshot_download == []


def test_a_missing_file_names_the_folder_or_the_repo(tmp_path, fake_snapshot_download, no_network):
    compressor().save_pretrained(tmp_path / "c")
    (tmp_path / "c" / WEIGHTS_FILE).unlink()
    message = "{} must hold lococo_config.json and lococo_compressor.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(message.format(tmp_path / "c"))):
        lococo.LoCoCoCompressor.from_pretrained(tmp_path / "c")
    compressor().save_pretrained(tmp_path / "d")
    (tmp_path / "d" / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(message.format(tmp_path / "d"))):
        lococo.LoCoCoCompressor.from_pretrained(tmp_path / "d")

    shutil.copytree(tmp_path / "c", tmp_path / "snapshot")                 # the repo has no weights file
    with pytest.raises(FileNotFoundError, match=rf"the Hugging Face Hub repo {REPO} must hold {CONFIG_FILE} and "
                                                rf"{WEIGHTS_FILE} .*it has no {WEIGHTS_FILE}"):
        lococo.LoCoCoCompressor.from_pretrained(REPO)
    # a config that is wrong still names the file and the field, downloaded or not
    (tmp_path / "snapshot" / WEIGHTS_FILE).write_bytes((tmp_path / "d" / WEIGHTS_FILE).read_bytes())
    meta = json.loads((tmp_path / "snapshot" / CONFIG_FILE).read_text())
    meta["config"]["beta"] = 2.5
    (tmp_path / "snapshot" / CONFIG_FILE).write_text(json.dumps(meta))
    file = tmp_path / "snapshot" / CONFIG_FILE
    with pytest.raises(ValueError, match=re.escape(f"{file}: config: beta must be an int")):
        lococo.LoCoCoCompressor.from_pretrained(REPO)


@pytest.fixture
def fake_hub_api(monkeypatch, tmp_path):
    """HfApi.create_repo and upload_folder replaced: the uploaded folder is copied to tmp_path / "uploaded"."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        full = repo_id if "/" in repo_id else f"someone/{repo_id}"     # the Hub puts a bare name under the user
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{full}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = {"repo_id": repo_id, **kwargs}
        shutil.copytree(folder_path, tmp_path / "uploaded", dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/0123"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_files_and_the_card(tmp_path, fake_hub_api, no_network):
    saved = compressor(seed=9)
    url = saved.push_to_hub(REPO, commit_message="a compressor", private=True, token="hf_x")
    assert url == f"https://huggingface.co/{REPO}/commit/0123"
    assert fake_hub_api["create_repo"]["repo_id"] == REPO and fake_hub_api["create_repo"]["private"] is True
    upload = fake_hub_api["upload_folder"]
    assert upload["repo_id"] == REPO and upload["commit_message"] == "a compressor"
    assert {p.name for p in (tmp_path / "uploaded").iterdir()} == FILES
    assert same(saved, lococo.LoCoCoCompressor.from_pretrained(tmp_path / "uploaded"))
    card = huggingface_hub.ModelCard.load(tmp_path / "uploaded" / "README.md")
    assert card.data.library_name == "lococo"
    assert f'LoCoCoCompressor.from_pretrained("{REPO}", model=model)' in card.text


def test_save_pretrained_with_push_to_hub(tmp_path, fake_hub_api, no_network):
    url = compressor().save_pretrained(tmp_path / "tiny-compressor", push_to_hub=True,
                                       model_card_kwargs={"base_model": "org/base"})
    assert url == f"https://huggingface.co/{REPO}/commit/0123"
    assert fake_hub_api["create_repo"]["repo_id"] == "tiny-compressor"      # the folder's name, by default
    assert fake_hub_api["upload_folder"]["repo_id"] == REPO
    assert {p.name for p in (tmp_path / "tiny-compressor").iterdir()} == FILES
    assert {p.name for p in (tmp_path / "uploaded").iterdir()} == FILES
    assert huggingface_hub.ModelCard.load(tmp_path / "uploaded" / "README.md").data.base_model == "org/base"


def test_import_lococo_and_folders_do_not_import_huggingface_hub(tmp_path):
    """huggingface_hub reads HF_HUB_OFFLINE once, on import: the lococo commands set it after `import lococo`."""
    code = f"""
import sys, lococo
c = lococo.LoCoCoCompressor.from_pretrained("smollm2-135m-m64")
c.save_pretrained({str(tmp_path / "c")!r})
lococo.LoCoCoCompressor.from_pretrained({str(tmp_path / "c")!r})
assert "huggingface_hub" not in sys.modules, "imported"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_without_huggingface_hub_folders_work_and_the_hub_names_the_hf_extra(tmp_path):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] == 'huggingface_hub':
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
import lococo
from lococo.extras import MissingExtraError
c = lococo.LoCoCoConfig
saved = lococo.LoCoCoCompressor.from_pretrained("smollm2-135m-m64")
saved.save_pretrained({str(tmp_path / "c")!r})
lococo.LoCoCoCompressor.from_pretrained({str(tmp_path / "c")!r})
for attempt in (lambda: lococo.LoCoCoCompressor.from_pretrained("someone/repo"),
                lambda: saved.push_to_hub("someone/repo"),
                lambda: saved.save_pretrained({str(tmp_path / "d")!r}, model_card=True)):
    try:
        attempt()
    except MissingExtraError as exc:
        assert exc.name == "huggingface_hub" and exc.extra == "hf", repr(exc)
        print(exc)
    else:
        raise AssertionError("no error")
"""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "c").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("loading 'someone/repo' from the Hugging Face Hub (there is no folder of that name "
                               "here) needs the 'hf' extra of lococo: 'huggingface_hub' is not installed")
    assert lines[1].startswith("LoCoCoCompressor.push_to_hub needs the 'hf' extra of lococo")
    assert lines[2].startswith("the model card of LoCoCoCompressor.save_pretrained needs the 'hf' extra of lococo")
    assert not (tmp_path / "d").exists()                                    # refused before anything is written
    assert all("pip install 'lococo[hf]'" in line for line in lines)

