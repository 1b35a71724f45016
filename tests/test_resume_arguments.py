"""A resume with any other argument is refused unless that argument is declared safe to change.

Every argument of `lococo train` and `lococo distill` is read from the command line's own parser and
changed in turn against a real checkpoint (``run_folder.open_run``, the check a resume makes before any
model loads). An argument that the recipe does not record (``Recipe.frozen`` or ``Recipe.resumable``)
and that ``SAFE`` below does not list fails here: a resume would go ahead silently on, say, other
documents. Arguments that fix the trained tensors are refused even with --resume-with-changes; the
others are taken with it, and the change is reported.
"""

from __future__ import annotations

import argparse
import copy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from train_helpers import TINY

from lococo.recipes import cli, distill, run_folder, train as train_module
from lococo.recipes.argtypes import UsageError

pytest_plugins = ["train_fixtures"]  # tiny_model, docs

# Arguments a resume may change without asking: where the run lives and how it reports and keeps its
# checkpoints, and the folder of the fetched (checksummed) assets.
COMMON_SAFE = {"output", "assets_dir", "skip_damaged", "save_every", "keep_checkpoints", "no_resume",
               "resume_with_changes", "overwrite", "no_progress"}
SAFE = {"train": COMMON_SAFE, "distill": COMMON_SAFE | {"compare_every"}}
RECIPES = {"train": train_module.TRAIN, "distill": distill.DISTILL}
EXTRA = {"train": {"world_size": 1}, "distill": {}}   # recorded values that are not arguments


def argv(command: str, tiny_model, docs, output) -> list[str]:
    common = ["--model", str(tiny_model), "--docs", *docs, "--output", str(output), "--no-progress"]
    if command == "train":
        return ["train", *common, *TINY, "-P", "8", "--steps", "1", "--save-every", "1"]
    return ["distill", *common, "-M", "8", "-B", "4", "--beta", "2", "--kernel-size", "3", "--seq-len", "48",
            "--sequences", "1", "--compare-every", "0", "--save-every", "1"]


def arguments(command: str) -> dict[str, argparse.Action]:
    """The command's arguments by destination, as its parser declares them."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    found = {}
    for action in sub._actions:
        if action.dest != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
            found.setdefault(action.dest, action)
    return found


def other_value(action: argparse.Action, value):
    """A value of the argument that differs from ``value`` (checked by no one: the resume check comes first)."""
    if action.choices:
        return next(choice for choice in action.choices if choice != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, list):
        return [*value[1:], "other.txt"]
    if isinstance(value, str):
        return value + "-other"
    assert value is None, (action.dest, value)
    if action.nargs in ("+", "*"):
        return ["other.txt"]
    return action.type("3") if action.type is not None else "other"


@pytest.fixture(scope="module", params=["train", "distill"])
def finished(request, tiny_model, docs, tmp_path_factory):
    """(command, its parsed arguments, a folder holding its run of one update or sequence)."""
    command = request.param
    output = tmp_path_factory.mktemp(command) / "run"
    line = argv(command, tiny_model, docs, output)
    assert cli.main(line) == 0
    return command, cli.build_parser().parse_args(line), output


def resume(command: str, args) -> run_folder.RunPlan:
    recipe = RECIPES[command]
    return run_folder.open_run(args, recipe, run_folder.run_arguments(args, recipe, **EXTRA[command]))


def test_every_argument_is_recorded_or_declared_safe_to_change():
    for command, recipe in RECIPES.items():
        names = set(arguments(command)) - {"command"}
        unrecorded = names - set(recipe.matters) - SAFE[command]
        assert not unrecorded, f"lococo {command}: a resume would not notice a change of {sorted(unrecorded)}"
        assert not SAFE[command] & set(recipe.matters), "declared safe, yet recorded"
        assert set(recipe.matters) <= names | set(EXTRA[command]), "recorded, yet no argument"


def test_a_resume_with_each_argument_changed_is_refused_unless_safe(finished):
    command, base, output = finished
    recipe = RECIPES[command]
    assert not resume(command, base).changes            # the same arguments: resumes as recorded
    assert resume(command, base).count == 1
    checked = []
    for name, action in arguments(command).items():
        if name == "command":
            continue
        changed = copy.deepcopy(base)
        setattr(changed, name, other_value(action, getattr(base, name)))
        flag = "--" + name.replace("_", "-")
        if name in SAFE[command]:
            if name in ("output", "no_resume", "overwrite"):   # another folder, or a new run: not a resume
                continue
            assert not resume(command, changed).changes, name
            continue
        checked.append(name)
        with pytest.raises(UsageError) as refusal:
            resume(command, changed)
        assert flag in str(refusal.value), (name, str(refusal.value))
        changed.resume_with_changes = True
        if name in recipe.frozen:
            with pytest.raises(UsageError, match="cannot resume with " + flag):
                resume(command, changed)
        else:
            plan = resume(command, changed)
            assert list(plan.changes) == [name], name
    # the ones that a resume on other data or another model must notice, among them
    assert {"docs", "model", "num_slots", "seed", "lr", "kernel_size"} <= set(checked)
    for name, value in EXTRA[command].items():   # train's number of processes
        with pytest.raises(UsageError, match=f"--{name.replace('_', '-')} {value!r} -> {value + 1!r}"):
            run_folder.open_run(base, recipe, run_folder.run_arguments(base, recipe, **{name: value + 1}))


def test_a_resume_on_other_documents_is_refused_from_the_command_line(finished, docs, capsys):
    command, base, output = finished
    line = [a for a in argv(command, base.model, docs, output) if a != docs[1]]   # one document of two
    with pytest.raises(SystemExit) as exit_info:
        cli.main(line)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--docs" in err and "--resume-with-changes" in err
