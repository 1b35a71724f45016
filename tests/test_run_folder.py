"""A training run's folder: no lost or mixed runs, resumes that honour (or refuse) changed arguments,
no pickle executed, and resumes that survive an interrupted write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from train_helpers import read_log, refused, train

from lococo import LoCoCoCompressor

pytest_plugins = ["train_fixtures"]  # tiny_model, docs

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "lococo"


@pytest.fixture(scope="module")
def finished_run(tiny_model, docs, tmp_path_factory) -> Path:
    """A run of 4 updates with checkpoints at 2 and 4; copy it before changing it."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert train(tiny_model, docs, out) == 0
    return out


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. lost runs -------------------------------------------------------------------------------

def test_no_resume_into_a_used_folder_is_refused_and_changes_nothing(finished_run, tiny_model, docs, tmp_path,
                                                                     capsys):
    out = copy_run(finished_run, tmp_path)
    before = folder_bytes(out)
    err = refused(capsys, tiny_model, docs, out, "--no-resume", "--steps", "2", "--save-every", "1")
    assert "holds a training run (checkpoints up to update 4)" in err and "--overwrite" in err
    assert folder_bytes(out) == before


def test_no_resume_with_overwrite_starts_a_clean_run(finished_run, tiny_model, docs, tmp_path):
    out = copy_run(finished_run, tmp_path)
    # before the fix, pruning kept the old run's step-4 and deleted this run's checkpoints
    assert train(tiny_model, docs, out, "--no-resume", "--overwrite", "--steps", "2", "--save-every", "1") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert [row["step"] for row in read_log(out)] == [1, 2]
    assert json.loads((out / "train_args.json").read_text())["steps"] == 2
    # a later resume with the same arguments finds this run, finished, and nothing of the old one
    assert train(tiny_model, docs, out, "--steps", "2", "--save-every", "1") == 0
    assert [row["step"] for row in read_log(out)] == [1, 2]


def test_a_compressor_is_not_overwritten_without_overwrite(tiny_model, docs, tmp_path, capsys):
    from transformers import AutoConfig

    out = tmp_path / "shipped"
    LoCoCoCompressor.for_model(AutoConfig.from_pretrained(tiny_model), num_slots=16).save_pretrained(out)
    before = folder_bytes(out)
    err = refused(capsys, tiny_model, docs, out, "--steps", "1")
    assert "holds a compressor that no training run in this folder wrote" in err and "--overwrite" in err
    assert folder_bytes(out) == before
    assert train(tiny_model, docs, out, "--steps", "1", "--overwrite") == 0
    assert folder_bytes(out)["lococo_compressor.safetensors"] != before["lococo_compressor.safetensors"]


# --- 2. resume with changed arguments ----------------------------------------------------------------

@pytest.mark.parametrize("change, named", [
    (["--lr", "0.1"], "--lr 0.05 -> 0.1"),
    (["--beta", "5"], "--beta 4 -> 5"),
    (["--steps", "6"], "--steps 4 -> 6"),
])
def test_resume_with_changed_arguments_is_refused_naming_them(finished_run, tiny_model, docs, tmp_path, capsys,
                                                              change, named):
    out = copy_run(finished_run, tmp_path)
    err = refused(capsys, tiny_model, docs, out, *change)
    assert named in err and "--resume-with-changes" in err


@pytest.mark.parametrize("change, named", [(["-M", "12"], "--num-slots"), (["--kernel-size", "3"], "--kernel-size")])
def test_shape_changes_are_refused_even_when_asked(finished_run, tiny_model, docs, tmp_path, capsys, change, named):
    out = copy_run(finished_run, tmp_path)
    err = refused(capsys, tiny_model, docs, out, *change, "--resume-with-changes")
    assert named in err and "cannot be loaded" in err and "Traceback" not in err


def test_resume_with_a_new_lr_uses_it(finished_run, tiny_model, docs, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(finished_run / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
    shutil.copy(finished_run / "train_args.json", out)
    assert train(tiny_model, docs, out, "--lr", "0.1", "--resume-with-changes") == 0
    lrs = [row["lr"]["compressor"] for row in read_log(out)]
    assert lrs == pytest.approx([0.1 * (1 - 2 / 4), 0.1 * (1 - 3 / 4)])   # updates 3 and 4, at the new rate
    record = json.loads((out / "train_args.json").read_text())
    assert record["lr"] == 0.1
    assert record["resumed_with_changes"] == [{"at_update": 2, "changes": {"lr": [0.05, 0.1]}}]


def test_raising_steps_of_a_finished_run_continues_at_a_live_rate(finished_run, tiny_model, docs, tmp_path):
    out = copy_run(finished_run, tmp_path)
    assert train(tiny_model, docs, out, "--steps", "6", "--resume-with-changes") == 0
    log = read_log(out)
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5, 6]
    # before the fix, update 5 ran at lr 0 (the finished schedule's last value)
    assert [row["lr"]["compressor"] for row in log[4:]] == pytest.approx([5e-2 * (1 - 4 / 6), 5e-2 * (1 - 5 / 6)])


# --- 3. no pickle is executed ----------------------------------------------------------------------------

class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_cannot_execute_code(finished_run, tiny_model, docs, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    marker = tmp_path / "executed"
    for step in ("step-2", "step-4"):
        state = out / "checkpoints" / step / "state.pt"
        torch.save({**torch.load(state, weights_only=True), "payload": Payload(marker)}, state)
    err = refused(capsys, tiny_model, docs, out)
    assert not marker.exists()
    assert "no checkpoint in" in err and "loads" in err


def test_the_package_never_loads_a_pickle():
    offenders = [f"{path.relative_to(PACKAGE)}:{number}" for path in PACKAGE.rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if "weights_only=False" in line or "pickle" in line]
    assert offenders == []


# --- 7. fragile resume ------------------------------------------------------------------------------------

def test_resume_survives_a_partial_log_line_and_a_corrupt_latest_checkpoint(finished_run, tiny_model, docs,
                                                                            tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    state = out / "checkpoints" / "step-4" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])            # a write cut short
    with open(out / "log.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 1.')              # a row cut short
    (out / "lococo_compressor.safetensors").unlink()
    assert train(tiny_model, docs, out) == 0
    err = capsys.readouterr().err
    assert "resuming from step-2" in err and "step-4" in err
    assert (out / "checkpoints" / "step-4.unreadable").is_dir()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-4.unreadable"]
    # updates 3 and 4 again, from step-2: the same weights and log as the uninterrupted run
    drop = ("seconds",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in read_log(out)]
            == [{k: v for k, v in r.items() if k not in drop} for r in read_log(finished_run)])
    a, b = LoCoCoCompressor.from_pretrained(finished_run), LoCoCoCompressor.from_pretrained(out)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)


def test_no_readable_checkpoint_is_refused(finished_run, tiny_model, docs, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    for step in ("step-2", "step-4"):
        (out / "checkpoints" / step / "state.pt").write_bytes(b"not a checkpoint")
    err = refused(capsys, tiny_model, docs, out)
    assert "no checkpoint in" in err and "--no-resume --overwrite" in err


def test_a_diverging_run_saves_nothing_non_finite(tiny_model, docs, tmp_path, capsys, monkeypatch):
    from lococo.recipes import train as train_module

    real_update = train_module.train_update

    def poisoned_update(session):
        row = real_update(session)
        if session.step == 3:
            with torch.no_grad():  # the next update starts from NaN weights
                session.compressor.layers[0].alpha.fill_(float("nan"))
        return row

    monkeypatch.setattr(train_module, "train_update", poisoned_update)
    out = tmp_path / "run"
    assert train(tiny_model, docs, out, "--steps", "6") == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "step-2" in err
    assert not (out / "lococo_compressor.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


def test_a_run_that_stopped_before_its_first_checkpoint(finished_run, tiny_model, docs, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    shutil.rmtree(out / "checkpoints")
    for name in ("lococo_config.json", "lococo_compressor.safetensors"):
        (out / name).unlink()
    err = refused(capsys, tiny_model, docs, out, "--lr", "0.1")          # another run: refused, naming what differs
    assert "holds another run that has no checkpoint (--lr 0.05 -> 0.1)" in err
    assert train(tiny_model, docs, out) == 0                              # the same run: started again, cleanly
    assert [row["step"] for row in read_log(out)] == [1, 2, 3, 4]
    assert read_log(out)[3]["loss"] == read_log(finished_run)[3]["loss"]
