"""Run folders that two processes, a crash or --overwrite cannot damage, errors that name the file, and the
checks of the documents a command reads (issue 25; the numbers are its items).

The lock is tested against a process that only takes it, the crashes by killing the checkpoint writer at
each of its file-system steps (with synthetic checkpoints, and once in a real `lococo distill`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from train_helpers import read_log, train

import lococo
from lococo.recipes import assets, cli, distill, evaluate, run_folder, train as train_module
from lococo.recipes.argtypes import UsageError

from hf_models import tiny_config

pytest_plugins = ["train_fixtures"]  # tiny_model, docs

DISTILL = ["-M", "8", "-B", "4", "--beta", "2", "--kernel-size", "3", "--seq-len", "48", "--compare-every", "0",
           "--save-every", "1", "--no-progress"]


def run_distill(tiny_model, docs, output, *extra) -> int:
    return cli.main(["distill", "--model", str(tiny_model), "--docs", *docs, "--output", str(output), *DISTILL,
                     "--sequences", "3", *extra])


def usage_error(capsys, command, *args) -> str:
    """Runs a command that must end with the usage exit (code 2); its message."""
    with pytest.raises(SystemExit) as exit_info:
        command(*args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


# --- synthetic checkpoints of both recipes ------------------------------------------------------------

def train_state(count: int) -> dict:
    param = torch.nn.Parameter(torch.full((3,), float(count)))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return {"step": count, "sequences": 2 * count, "trainable": {"compressor.w": param.detach().clone()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": train_module.rng_state(), "args": {"steps": 5}}


def distill_state(count: int):
    torch.manual_seed(count)
    compressor = lococo.LoCoCoCompressor.for_model(tiny_config(), num_slots=8, beta=2, kernel_size=3)
    with torch.no_grad():
        for layer in compressor.layers:
            layer.alpha.fill_(count / 10)
    optimizers = [torch.optim.AdamW(layer.parameters()) for layer in compressor.layers]
    return compressor, optimizers, count, {"sequences": 5}


def content(recipe: run_folder.Recipe, state) -> list[torch.Tensor]:
    """The tensors that make a checkpoint's state what it is, as saved (a tuple) or loaded (a Checkpoint)."""
    if recipe is train_module.TRAIN:
        return list(state["trainable"].values()) + [state["rng"]["torch"]]
    compressor = state[0]
    return list(compressor.state_dict().values())


RECIPES = {"train": (train_module.TRAIN, train_state), "distill": (distill.DISTILL, distill_state)}
RUN_ARGS = {"train": {"steps": 5}, "distill": {"sequences": 5}}   # as the synthetic checkpoints record them


def plain_args(output: Path, **flags) -> argparse.Namespace:
    return argparse.Namespace(**{"output": str(output), "overwrite": False, "no_resume": False,
                                 "resume_with_changes": False, **flags})


# --- 1. no lock on a run folder ---------------------------------------------------------------------

HOLDER = ("import sys; from pathlib import Path; from lococo.recipes import run_folder\n"
          "with run_folder.lock(Path(sys.argv[1])):\n"
          "    print('locked', flush=True)\n"
          "    sys.stdin.read()\n")


def test_a_second_run_on_a_folder_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(
        tiny_model, docs, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # before the lock, the first of two distills died and the second logged sequences [2, 3, 4, 5, 6]
        for command in (train, run_distill):
            err = usage_error(capsys, command, tiny_model, docs, out)
            assert f"--output {out} is in use by another run (pid {holder.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [".lococo.lock"]    # nothing was written
        holder.kill()                                                          # no chance to release it
        holder.wait()
    finally:
        holder.kill()
        holder.wait()
    with run_folder.lock(out):
        assert f"was locked by pid {holder.pid}, which ended without releasing it" in capsys.readouterr().err
        with pytest.raises(UsageError, match=f"in use by another run \\(pid {os.getpid()}"):
            with run_folder.lock(out):
                pass
    assert not (out / ".lococo.lock").exists()                                 # released: nothing left behind


def test_the_lock_is_released_when_a_run_is_refused_or_fails(tiny_model, docs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    (out / "train_args.json").parent.mkdir()
    (out / "train_args.json").write_text("{}")
    usage_error(capsys, train, tiny_model, docs, out, "--no-resume")          # refused: holds a run
    monkeypatch.setattr(train_module, "run_updates", lambda session: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(tiny_model, docs, out, "--no-resume", "--overwrite")
    with run_folder.lock(out):
        assert "ended without releasing" not in capsys.readouterr().err


# --- 2. checkpoint writes that a crash cannot damage ----------------------------------------------------

class Killed(BaseException):
    """The writer dies here (raised in place of a file-system call; no handler of the package catches it)."""


@contextlib.contextmanager
def killed_at(monkeypatch, step: int):
    """Kills the writer at its ``step``-th call of os.replace, os.fsync or shutil.rmtree; yields the steps killed."""
    calls, fired = [0], []

    def dying(real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                fired.append(step)
                raise Killed
            return real(*args, **kwargs)
        return call

    with monkeypatch.context() as patch:
        for owner, name in ((os, "replace"), (os, "fsync"), (shutil, "rmtree")):
            patch.setattr(owner, name, dying(getattr(owner, name)))
        yield fired


@pytest.mark.parametrize("name", RECIPES)
def test_a_kill_at_any_step_of_a_checkpoint_write_leaves_one_to_resume_from(name, tmp_path, monkeypatch, capsys):
    recipe, state_at = RECIPES[name]
    base = tmp_path / "base"
    for count in (1, 2):
        run_folder.save_checkpoint(base, recipe, count, state_at(count), keep=2)
    resumed = []
    for step in range(1, 100):
        out = tmp_path / f"killed-at-{step}"
        shutil.copytree(base, out)
        with killed_at(monkeypatch, step) as fired:
            try:   # checkpoint 3, then checkpoint 1 deleted (keep 2)
                run_folder.save_checkpoint(out, recipe, 3, state_at(3), keep=2)
            except Killed:
                pass
        if not fired:
            break   # the write ended before this step: every step has been killed
        leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.suffix in (".tmp", ".old")]
        capsys.readouterr()
        run_folder.recover(out, recipe)
        notes = capsys.readouterr().err
        assert all(f"removed {out / 'checkpoints' / leftover}" in notes for leftover in leftovers)
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert not [n for n in names if n.endswith((".tmp", ".old"))], names
        # the resume takes the newest checkpoint, complete and as it was saved
        plan = run_folder.open_run(plain_args(out), recipe, RUN_ARGS[name])
        assert plan.checkpoint.name == f"{recipe.prefix}-{plan.count}" and not plan.unreadable
        for got, want in zip(content(recipe, plan.state), content(recipe, state_at(plan.count)), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        resumed.append(plan.count)
    assert step > 4 and resumed[0] == 2 and resumed[-1] == 3   # killed before and after the rename


def test_distill_killed_while_writing_a_checkpoint_resumes_to_the_same_result(tiny_model, docs, tmp_path,
                                                                              monkeypatch, capsys):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_distill(tiny_model, docs, straight) == 0
    real_save = distill.save_checkpoint

    def save(output, compressor, optimizers, sequences, *rest):
        with killed_at(monkeypatch, 2) if sequences == 2 else contextlib.nullcontext():  # after fsync, before rename
            real_save(output, compressor, optimizers, sequences, *rest)

    monkeypatch.setattr(distill, "save_checkpoint", save)
    with pytest.raises(Killed):
        run_distill(tiny_model, docs, killed)
    monkeypatch.setattr(distill, "save_checkpoint", real_save)
    assert (killed / "checkpoints" / "sequence-2.tmp").is_dir()
    assert run_distill(tiny_model, docs, killed) == 0            # the lock was released by the dead run
    assert "sequence-2.tmp: a checkpoint whose write was interrupted" in capsys.readouterr().err
    assert without_seconds(read_log(killed)) == without_seconds(read_log(straight))
    a, b = lococo.LoCoCoCompressor.from_pretrained(straight), lococo.LoCoCoCompressor.from_pretrained(killed)
    for (key, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=key)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["sequence-2", "sequence-3"]


@pytest.mark.parametrize("left, resumed", [
    ({"checkpoint": 2, "checkpoint.old": None}, 2),        # killed while checkpoint.old was being removed
    ({"checkpoint.old": 1, "checkpoint.tmp": 2}, 2),       # killed between the two renames
    ({"checkpoint": 1, "checkpoint.tmp": None}, 1),        # killed while checkpoint.tmp was being written
])
def test_the_checkpoint_swap_of_earlier_versions_is_recovered(left, resumed, tmp_path, capsys):
    """Earlier distills kept one checkpoint/ and swapped it through checkpoint.old: a kill in the swap made every
    later resume fail, or silently start again from sequence 1."""
    out = tmp_path / "run"
    for name, count in left.items():   # None: a checkpoint cut short
        (out / name).mkdir(parents=True)
        distill.save_checkpoint_files(out / name, distill_state(count or 3))
        if count is None:
            shutil.rmtree(out / name / "compressor")
    run_folder.recover(out, distill.DISTILL)
    err = capsys.readouterr().err
    for name, count in left.items():
        assert (f"moved {out / name} to {out / 'checkpoints' / f'sequence-{count}'}" if count
                else f"{out / name} does not load and is set aside") in err
    plan = run_folder.open_run(plain_args(out), distill.DISTILL, {"sequences": 5})
    assert plan.count == resumed


# --- 3. --overwrite deletes only what a run writes ---------------------------------------------------------

def test_overwrite_refuses_what_no_run_wrote_and_names_it(tiny_model, docs, tmp_path, capsys):
    out = tmp_path / "shipped"
    lococo.LoCoCoCompressor.for_model(tiny_config(), num_slots=8).save_pretrained(out)
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "notes.txt").write_text("mine")
    before = folder_bytes(out)
    for command in (train, run_distill):    # before the fix, train removed model/ and checkpoints/notes.txt
        err = usage_error(capsys, command, tiny_model, docs, out, "--overwrite")
        assert f"--output {out} also holds checkpoints/notes.txt, model: move them away" in err
        assert folder_bytes(out) == before


def test_overwrite_replaces_the_runs_own_files_only(tmp_path, capsys):
    out = tmp_path / "run"
    run_folder.save_checkpoint(out, train_module.TRAIN, 2, train_state(2), keep=2)
    (out / "checkpoints" / "step-3.unreadable").mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    (out / "model").mkdir()                                   # written by a run with --lora
    (out / "train_args.json").write_text(json.dumps({"lora": True, "steps": 5}))
    (out / "checkpoints" / "step-2" / "notes.txt").write_text("mine")
    args = plain_args(out, no_resume=True, overwrite=True)
    with pytest.raises(UsageError, match="also holds checkpoints/step-2/notes.txt: move it away"):
        run_folder.open_run(args, train_module.TRAIN, {})
    (out / "checkpoints" / "step-2" / "notes.txt").unlink()
    plan = run_folder.open_run(args, train_module.TRAIN, {})
    run_folder.prepare_folder(plan, {"steps": 1})
    assert sorted(p.name for p in out.iterdir()) == ["train_args.json"]


# --- 4, 7. every load checks what it reads and names the file and the field -------------------------------

class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", RECIPES)
def test_a_checkpoint_that_holds_an_object_is_refused_naming_it_without_advice_to_load_it_unsafely(
        name, tmp_path, capsys):
    recipe, state_at = RECIPES[name]
    out = tmp_path / "run"
    folder = run_folder.save_checkpoint(out, recipe, 1, state_at(1), keep=2)
    marker = tmp_path / "executed"
    torch_file = folder / ("state.pt" if name == "train" else "optimizers.pt")
    torch.save({"payload": Payload(marker)}, torch_file)
    with pytest.raises(UsageError) as info:
        run_folder.open_run(plain_args(out), recipe, {})
    message = str(info.value)
    assert f"{torch_file}: does not load: it holds Python objects (getattr), not only tensors" in message
    assert "weights_only" not in message and not marker.exists()


def test_a_corrupt_distill_checkpoint_is_set_aside_as_trains_is(tmp_path, capsys):
    out = tmp_path / "run"
    for count in (1, 2):
        run_folder.save_checkpoint(out, distill.DISTILL, count, distill_state(count), keep=2)
    state = out / "checkpoints" / "sequence-2" / "optimizers.pt"
    state.write_bytes(state.read_bytes()[:100])                # a write cut short (by hand: ours are atomic)
    plan = run_folder.open_run(plain_args(out), distill.DISTILL, {"sequences": 5})
    run_folder.prepare_folder(plan, {})
    assert plan.count == 1 and f"{state}: does not load: cut short" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["sequence-1", "sequence-2.unreadable"]


@pytest.mark.parametrize("name, file, change, named", [
    ("distill", "progress.json", {"sequences": -3},
     "progress.json: field 'sequences' must be a count (an integer >= 0), found -3"),
    ("distill", "progress.json", {"sequences": True}, "progress.json: field 'sequences' must be a count"),
    ("distill", "progress.json", {"args": [1]}, "progress.json: field 'args' must be dict, found a list"),
    ("distill", "progress.json", {"sequences": 9}, "sequence-1: holds sequence 9, its name says 1"),
    ("distill", "progress.json", {"args": {"sequences": 0}}, "sequence-1: sequence 1 is past the end of its run"),
    ("train", "run_args.json", None, "run_args.json: expected a JSON object, found a list"),
    ("train", "state.pt", {"step": "4"}, "state.pt: field 'step' must be a count (an integer >= 0), found '4'"),
    ("train", "state.pt", {"rng": {}}, "state.pt: field 'rng' must be the random states"),
])
def test_a_checkpoint_with_a_bad_field_is_refused_naming_the_file_and_the_field(name, file, change, named,
                                                                                tmp_path):
    recipe, state_at = RECIPES[name]
    out = tmp_path / "run"
    folder = run_folder.save_checkpoint(out, recipe, 1, state_at(1), keep=2)
    path = folder / file
    if file.endswith(".pt"):
        torch.save({**torch.load(path, weights_only=True), **change}, path)
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **change} if change else [1]))
    with pytest.raises(UsageError) as info:
        run_folder.open_run(plain_args(out), recipe, {})
    assert f"no checkpoint in {out / 'checkpoints'} loads ({folder}" in str(info.value) and named in str(info.value)


def test_a_damaged_progress_file_stops_distill_before_it_trains(tiny_model, docs, tmp_path, capsys):
    out = tmp_path / "run"
    run_folder.save_checkpoint(out, distill.DISTILL, 1, distill_state(1), keep=2)
    progress = out / "checkpoints" / "sequence-1" / "progress.json"
    progress.write_text(json.dumps({"sequences": -3}))   # before the fix, distill trained sequences -2 ... 6
    err = usage_error(capsys, run_distill, tiny_model, docs, out)
    assert f"{progress}: field 'sequences' must be a count" in err and "Traceback" not in err
    assert not (out / "log.jsonl").exists()


def test_a_damaged_record_is_named(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_args.json").write_text('{"resumed_with_changes": 3}')
    with pytest.raises(UsageError, match=r"train_args.json: field 'resumed_with_changes' must be list, found 3"):
        run_folder.open_run(plain_args(out), train_module.TRAIN, {})
    (out / "train_args.json").write_text("{cut")
    with pytest.raises(UsageError, match=r"train_args.json: does not load as JSON"):
        run_folder.open_run(plain_args(out), train_module.TRAIN, {})


# --- 5. damaged assets, 10. binary input ----------------------------------------------------------------

@pytest.fixture
def fetched(tmp_path, monkeypatch):
    """A fetched eval source of two documents, and a split that names them: (cache, split file, documents)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    source = assets.TextSource("fake", "npm", "fake@1.0", "package/", ("*.txt",), role="eval")
    monkeypatch.setitem(assets.SOURCES, "fake", source)
    folder = cache / "text" / "fake"
    folder.mkdir(parents=True)
    texts = {"a.txt": "alpha " * 40, "b.txt": "beta " * 40}
    for name, text in texts.items():
        (folder / name).write_text(text)
    files = {name: {"size": len(text), "sha256": assets.sha256_file(folder / name)} for name, text in texts.items()}
    (folder / assets.MARKER).write_text(json.dumps({"archive": "fake@1.0", "version": "1.0", "files": files}))
    docs = [{"id": f"fake:{name}", "tokens": 40, "sha256": info["sha256"]} for name, info in files.items()]
    split = tmp_path / "split.json"
    assets.write_split({"version": 1, "train": docs, "dev": [], "test": docs}, split)
    return cache, split, folder


def test_a_damaged_document_is_refused_or_with_a_flag_left_out(fetched, capsys):
    cache, split, folder = fetched
    (folder / "a.txt").write_text("alpha " * 20)                 # truncated after the fetch
    assert not assets.status()["fake"]["ok"]
    evaluation = argparse.Namespace(docs=None, split_file=str(split), split="test", max_docs=None, assets_dir=None,
                                    start_token=0, max_tokens=5)
    training = argparse.Namespace(docs=None, split_file=str(split), max_docs=None, assets_dir=None)
    for select in (lambda: evaluate.select_documents(evaluation), lambda: train_module.training_documents(training,
                                                                                                           None)):
        with pytest.raises(assets.AssetError, match="1 fetched document\\(s\\) are damaged") as info:
            select()   # before the fix, eval scored it
        assert str(folder / "a.txt") in str(info.value) and "--only fake --force" in str(info.value)
        assert "--skip-damaged" not in str(info.value)           # these Namespaces have no such flag
    evaluation.skip_damaged = training.skip_damaged = True
    docs, left_out = evaluate.select_documents(evaluation)
    assert [name for name, _ in docs] == ["fake:b.txt"] and left_out == ["fake:a.txt"]
    assert train_module.training_documents(training, None)[0] == [("fake:b.txt", 40)]
    assert "fake:a.txt (damaged)" in capsys.readouterr().err
    (folder / "b.txt").write_text("BETA " * 40)                  # the same size: found when it is read
    with pytest.raises(assets.AssetError, match=f"{folder / 'b.txt'} \\(fake:b.txt\\) is damaged: its SHA-256"):
        assets.read_document("fake:b.txt")


def test_distill_refuses_a_damaged_document_unless_told_to_skip_it(tiny_model, fetched, tmp_path, capsys):
    _, split, folder = fetched
    (folder / "a.txt").write_text("alpha " * 20)
    assert cli.main(["distill", "--model", str(tiny_model), "--split-file", str(split), "--output",
                     str(tmp_path / "run"), *DISTILL, "--sequences", "1"]) == 2
    assert "--skip-damaged to leave them out" in capsys.readouterr().err


def test_binary_input_is_refused_and_a_few_bad_bytes_are_warned_about(tiny_model, tmp_path, capsys):
    binary = tmp_path / "program"
    binary.write_bytes(Path(sys.executable).resolve().read_bytes()[:3000])
    err = usage_error(capsys, cli.main, ["eval", "--model", str(tiny_model), "--docs", str(binary), "--methods",
                                         "full", "--max-tokens", "64", "--buckets", "0,64", "--output",
                                         str(tmp_path / "eval"), "--no-progress"])
    assert f"--docs {binary} is not a text file (it holds NUL bytes)" in err  # before the fix: ppl 56752, exit 0
    with pytest.raises(UsageError, match="is not a text file"):
        train_module.training_documents(argparse.Namespace(docs=[str(binary)], max_docs=None), None)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait, ".encode("latin-1") * 3 + b"plain text " * 20)
    assert assets.read_text_file(latin).startswith("caf\ufffd au lait")
    assert "3 byte(s) are not UTF-8" in capsys.readouterr().err
