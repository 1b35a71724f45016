"""A training run's folder, for `lococo train` and `lococo distill` alike: one run per folder, one process at a
time, and checkpoints that no crash can damage.

A folder holds one run: ``train_args.json`` (every argument, and the changes of each resume), ``log.jsonl``
(one row per update or batch of sequences; ``log.csv`` and ``loss.png`` are drawn from it), the compressor
at the end, and ``checkpoints/<prefix>-N/``, what a resume needs after N updates (train, ``step-N``) or
sequences (distill, ``sequence-N``) with the arguments that matter. What a checkpoint holds and how it is
read and checked is the recipe's (its ``Recipe``: the codec); the rules here are the same for both.

- **Lock.** A run holds an advisory lock (``flock``) on ``.lococo.lock`` in its folder from before it reads
  the folder until it exits, however it exits: a second run on the folder is refused, naming the pid that
  holds it. The file is removed on exit, so one found on entry was left by a run that was killed; the new
  run says so and takes the lock.
- **Atomic checkpoints.** A checkpoint is written beside its final name (``step-N.tmp``), synced to disk and
  renamed in one step, so that every ``step-N`` is complete at every instant; old ones are renamed ``*.old``
  before they are deleted. A run that finds a ``*.tmp`` or ``*.old`` (a crash in a write or a deletion)
  removes it and says so. The record and the trimmed log are replaced the same way.
- **Checked loads.** Every checkpoint, record and progress file is checked before use; ``DamagedFile`` names
  the file and the field. Tensors load with ``torch.load(weights_only=True)``: a run folder never executes
  code. A checkpoint that does not load is set aside (``step-N.unreadable``) and the one before it is used.
- **Resume.** The same command resumes from the newest checkpoint that loads. Arguments that fix the
  trainable tensors (``Recipe.frozen``) cannot change; the others (``Recipe.resumable``) only with
  ``--resume-with-changes``, which applies them from the next update and records the change.
- **New runs.** ``--no-resume`` into a folder that holds a run, and a run over a compressor that no run in
  the folder wrote, are refused unless ``--overwrite``. It replaces only what a run writes: anything else
  in the folder (a file of yours, a ``model/`` the run did not write) makes it refuse, naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .argtypes import UsageError

ARGS_FILE = "train_args.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lococo.lock"
COMPRESSOR_FILES = ("lococo_config.json", "lococo_compressor.safetensors")  # save_pretrained's (no torch import here)
# Every file a run writes at the top of its folder (the write probe of check_writable, the atomic writes' .tmp)
RUN_FILES = (ARGS_FILE, LOG_FILE, "log.csv", "loss.png", *COMPRESSOR_FILES, LOCK_FILE, ".lococo-write-test",
             ARGS_FILE + ".tmp", LOG_FILE + ".tmp")
LEFTOVERS = {".tmp": "a checkpoint whose write was interrupted", ".old": "a checkpoint whose deletion was interrupted"}
UNREADABLE = ".unreadable"


class DamagedFile(ValueError):
    """A checkpoint, record or progress file that does not hold what it should; the message names it and the field."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as its recipe's ``load`` read it."""

    count: int            # updates (train) or sequences (distill) done
    args: dict | None     # the arguments that matter, as recorded with it (None: not recorded)
    state: object         # what the recipe resumes from


@dataclass(frozen=True)
class Recipe:
    """What the run folders of `lococo train` and `lococo distill` differ in: the checkpoint codec and the arguments."""

    unit: str                     # what a checkpoint counts: "update" or "sequence"
    log_key: str                  # that count in a log row ("step", "sequences")
    total: str                    # the argument that sets the run's length ("steps", "sequences")
    prefix: str                   # checkpoints are the folders checkpoints/<prefix>-<count>
    frozen: tuple[str, ...]       # arguments a resume can never change (the trainable tensors and their groups)
    resumable: tuple[str, ...]    # arguments a resume changes only with --resume-with-changes
    files: tuple[str, ...]        # the paths in a checkpoint folder, all written by ``save``
    save: Callable[[Path, object], None]     # writes a checkpoint's state into an empty folder
    load: Callable[[Path], Checkpoint]       # reads one and checks it (DamagedFile naming the file and the field)
    outputs: Callable[[dict], tuple[str, ...]] = lambda record: ()   # the run's other files or folders, by its record
    legacy: tuple[str, ...] = ()  # checkpoint folders of earlier versions, moved into checkpoints/ when found

    @property
    def matters(self) -> tuple[str, ...]:
        return self.frozen + self.resumable


def add_arguments(group) -> None:
    """--keep-checkpoints, --no-resume, --resume-with-changes and --overwrite, for `lococo train` and `distill`."""
    from .argtypes import non_negative_int

    group.add_argument("--keep-checkpoints", type=non_negative_int, default=2,
                       help="keep the newest N checkpoints (0: all)")
    group.add_argument("--no-resume", action="store_true",
                       help="start a new run; refused when --output holds one, unless --overwrite")
    group.add_argument("--resume-with-changes", action="store_true",
                       help="resume although arguments that matter differ from the checkpoint's; the new "
                            "values apply from the next update")
    group.add_argument("--overwrite", action="store_true",
                       help="with --no-resume: delete the run in --output first; also allows replacing a "
                            "compressor that no run in --output wrote. Only what a run writes is deleted: "
                            "anything else in --output is refused")


def run_arguments(args, recipe: Recipe, **values) -> dict:
    """The arguments that matter to a run (``values`` for those that are not command-line arguments), as JSON values."""
    found = {name: getattr(args, name) for name in recipe.matters if name not in values}
    return json.loads(json.dumps({**found, **values}, default=str))


def differences(old: dict, new: dict, names) -> dict[str, list]:
    return {name: [old.get(name), new.get(name)] for name in names if old.get(name) != new.get(name)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def describe(changes: dict[str, list]) -> str:
    return ", ".join(f"{_flag(name)} {old!r} -> {new!r}" for name, (old, new) in changes.items())


def _warn(message: str, kind: str = "warning") -> None:
    print(f"lococo: {kind}: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def lock(output: Path) -> Iterator[None]:
    """Holds the folder's lock (creating the folder) until the block exits; UsageError when another process holds it."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")
    path = output / LOCK_FILE
    try:
        output.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path)
    except OSError as exc:
        raise UsageError(f"--output {output} cannot be written: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still held: a process that opened this file retries on the new one
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "not yet written"
            os.close(fd)
            raise UsageError(f"--output {path.parent} is in use by another run (pid {holder}, which holds "
                             f"{path}); wait for it to end, or choose another folder") from None
        except OSError as exc:   # a file system without locks: run, but say that nothing stops a second run
            _warn(f"cannot lock {path} ({exc.strerror}): nothing stops a second run on this folder")
            return fd
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file as it ended: lock the new one
    left = os.read(fd, 64).decode(errors="replace").strip()
    if left:
        _warn(f"{path.parent} was locked by pid {left}, which ended without releasing it (killed?); "
              "the lock is taken over", "note")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# ----------------------------------------------------------------------------------------
# Checked reads
# ----------------------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    """A JSON object from ``path``; DamagedFile when it does not load or is not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DamagedFile(f"{path}: does not load as JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise DamagedFile(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def load_tensors(path: Path):
    """``torch.load(weights_only=True)``: tensors and plain containers only; DamagedFile (never torch's advice to
    load unsafely) when the file holds anything else or is cut short."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: any failure means "not usable"
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = (f"it holds Python objects ({found.group(1)}), not only tensors; a run folder never runs code" if found
               else f"cut short or not a torch file ({type(exc).__name__}: {_first_line(exc)})")
        raise DamagedFile(f"{path}: does not load: {why}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if "weights_only" not in line]
    return (lines or [""])[0][:200]


def get(path: Path, data, name: str, kind: type | tuple[type, ...], ok: Callable = lambda value: True,
        expected: str = ""):
    """``data[name]`` checked: of ``kind`` (a bool is no int) and ``ok``; DamagedFile naming the file and the field."""
    if not isinstance(data, dict):
        raise DamagedFile(f"{path}: expected a mapping of fields, found a {type(data).__name__}")
    if name not in data:
        raise DamagedFile(f"{path}: field {name!r} is missing")
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds) or not ok(value):
        shown = repr(value) if isinstance(value, (int, float, str, type(None))) else f"a {type(value).__name__}"
        raise DamagedFile(f"{path}: field {name!r} must be {expected or ' or '.join(k.__name__ for k in kinds)}, "
                          f"found {shown[:80]}")
    return value


def get_count(path: Path, data, name: str) -> int:
    return get(path, data, name, int, lambda n: n >= 0, "a count (an integer >= 0)")


def _failure(folder: Path, exc: Exception) -> str:
    return str(exc) if isinstance(exc, DamagedFile) else f"{folder}: {type(exc).__name__}: {_first_line(exc)}"


# ----------------------------------------------------------------------------------------
# What the folder holds
# ----------------------------------------------------------------------------------------

def checkpoints(output: Path, recipe: Recipe) -> list[tuple[int, Path]]:
    """(count, folder) of the checkpoints, newest first (each is complete: written beside, then renamed)."""
    name = re.compile(rf"{re.escape(recipe.prefix)}-(\d+)")
    found = [(int(m.group(1)), p) for p in (output / CHECKPOINTS).glob(f"{recipe.prefix}-*")
             if (m := name.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def holds_run(output: Path, recipe: Recipe) -> bool:
    return (output / ARGS_FILE).is_file() or (output / LOG_FILE).is_file() or bool(checkpoints(output, recipe))


def read_record(output: Path) -> dict | None:
    """The folder's record (train_args.json), None when there is none; DamagedFile when it does not load."""
    path = output / ARGS_FILE
    if not path.exists():
        return None
    record = read_json(path)
    if "resumed_with_changes" in record:
        get(path, record, "resumed_with_changes", list)
    return record


def sort_entries(output: Path, recipe: Recipe, record: dict | None) -> tuple[list[Path], list[Path]]:
    """(what a run writes, anything else) in the folder: what a new run may delete, and what it must not."""
    top = {*RUN_FILES, *recipe.outputs(record or {}), *recipe.legacy, *(name + UNREADABLE for name in recipe.legacy)}
    ours = re.compile(rf"{re.escape(recipe.prefix)}-\d+(\.tmp|\.old|{re.escape(UNREADABLE)})?")
    own, other = [], []
    for entry in sorted(output.iterdir()) if output.is_dir() else []:
        if entry.name != CHECKPOINTS or not entry.is_dir():
            (own if entry.name in top else other).append(entry)
            continue
        for folder in sorted(entry.iterdir()):
            if not (ours.fullmatch(folder.name) and folder.is_dir()):
                other.append(folder)
                continue
            strays = [p for p in sorted(folder.rglob("*"))
                      if not p.is_dir() and p.relative_to(folder).as_posix() not in recipe.files]
            (other.extend(strays) if strays else own.append(folder))
    return own, other


# ----------------------------------------------------------------------------------------
# Recovery, on entry (under the lock, before the folder is read)
# ----------------------------------------------------------------------------------------

def recover(output: Path, recipe: Recipe) -> None:
    """Removes the leftovers of a crash (``*.tmp``, ``*.old`` checkpoints) and moves checkpoints of earlier
    versions into ``checkpoints/``; says what it did."""
    for path in sorted((output / CHECKPOINTS).glob(f"{recipe.prefix}-*")):
        if path.suffix in LEFTOVERS and path.is_dir():
            shutil.rmtree(path)
            _warn(f"removed {path}: {LEFTOVERS[path.suffix]}", "note")
    for name in recipe.legacy:
        if (output / name).is_dir():
            _adopt(output / name, recipe)


def _adopt(path: Path, recipe: Recipe) -> None:
    """A checkpoint folder of an earlier version's layout, moved to checkpoints/ (set aside when it does not load)."""
    try:
        count = recipe.load(path).count
    except Exception as exc:
        os.replace(path, path.with_name(path.name + UNREADABLE))
        _warn(f"{path} does not load and is set aside as {path.name + UNREADABLE} ({_failure(path, exc)})")
        return
    target = path.parent / CHECKPOINTS / f"{recipe.prefix}-{count}"
    if target.exists():
        shutil.rmtree(path)
        _warn(f"removed {path}: {target} holds the same {recipe.unit}", "note")
        return
    target.parent.mkdir(exist_ok=True)
    os.replace(path, target)
    _warn(f"moved {path} to {target} (this version's layout)", "note")


# ----------------------------------------------------------------------------------------
# Start or resume
# ----------------------------------------------------------------------------------------

@dataclass
class RunPlan:
    """What ``open_run`` decided: start fresh (after deleting the run's files when ``wipe``) or resume."""

    output: Path
    recipe: Recipe
    run_args: dict
    wipe: list[Path] | None = None   # the run's own files and folders, deleted before it starts again
    checkpoint: Path | None = None
    state: object = None             # the checkpoint's state, until the recipe has taken it
    count: int = 0                   # updates or sequences done by the checkpoint resumed from
    changes: dict[str, list] = field(default_factory=dict)
    history: list = field(default_factory=list)   # the record's earlier resumes with changes
    unreadable: list[Path] = field(default_factory=list)


def open_run(args, recipe: Recipe, run_args: dict) -> RunPlan:
    """Decides from the folder and the arguments whether to start or resume; refuses what would lose or mix runs.

    Reads only (after ``recover``); ``prepare_folder`` then changes the folder, on the main process.
    """
    output = Path(args.output)
    plan = RunPlan(output, recipe, run_args)
    found = checkpoints(output, recipe)
    if not holds_run(output, recipe):
        if any((output / name).exists() for name in COMPRESSOR_FILES):
            if not args.overwrite:
                raise UsageError(f"--output {output} holds a compressor that no training run in this folder "
                                 "wrote; pass --overwrite to replace it, or choose another folder")
            _overwrite(plan, None)
        return plan
    if args.no_resume:
        if not args.overwrite:
            what = f"checkpoints up to {recipe.unit} {found[0][0]}" if found else "a log and recorded arguments"
            raise UsageError(f"--output {output} holds a training run ({what}); --no-resume would mix two runs "
                             "in one folder: pass --overwrite as well to delete it and start over, or choose "
                             "another folder")
        try:
            record = read_record(output)
        except DamagedFile:
            record = None
        _overwrite(plan, record)
        return plan
    record = _record(output)
    plan.history = (record or {}).get("resumed_with_changes", [])
    if found:
        return _resume(args, plan, found, record)
    # a run that stopped before its first checkpoint: nothing to resume, so start it again if it is the same
    changed = differences(record or {}, run_args, recipe.matters)
    if record is None or changed:
        raise UsageError(f"--output {output} holds another run that has no checkpoint"
                         + (f" ({describe(changed)})" if record else "")
                         + "; pass --no-resume --overwrite to delete it, or choose another folder")
    plan.wipe = sort_entries(output, recipe, record)[0]
    return plan


def _record(output: Path) -> dict | None:
    try:
        return read_record(output)
    except DamagedFile as exc:
        raise UsageError(f"{exc}; repair or delete it, or pass --no-resume --overwrite to start over") from None


def _overwrite(plan: RunPlan, record: dict | None) -> None:
    """--overwrite: the run's own files go; anything else in the folder is refused, by name."""
    own, other = sort_entries(plan.output, plan.recipe, record)
    if other:
        names = ", ".join(str(p.relative_to(plan.output)) for p in other[:3]) + (" ..." if len(other) > 3 else "")
        raise UsageError(f"--overwrite replaces only what a run writes, and --output {plan.output} also holds "
                         f"{names}: move {'them' if len(other) > 1 else 'it'} away, or choose another folder")
    plan.wipe = own


def _resume(args, plan: RunPlan, found: list[tuple[int, Path]], record: dict | None) -> RunPlan:
    """The newest checkpoint that loads, checked against the arguments; the ones that do not load are set aside."""
    recipe, errors = plan.recipe, []
    for count, folder in found:
        try:
            checkpoint = recipe.load(folder)
            _check_count(folder, checkpoint, count, recipe)
        except Exception as exc:  # a truncated, foreign or inconsistent checkpoint: "not usable"
            errors.append(_failure(folder, exc))
            plan.unreadable.append(folder)
            continue
        plan.checkpoint, plan.state, plan.count = folder, checkpoint.state, checkpoint.count
        recorded = checkpoint.args if checkpoint.args is not None else record
        where = f"{folder} ({recipe.unit} {plan.count})"
        if recorded is None:
            if not args.resume_with_changes:
                raise UsageError(f"the arguments that {where} was trained with are not recorded; pass "
                                 "--resume-with-changes to resume it with these, or --no-resume --overwrite")
        else:
            plan.changes = check_resume(where, recorded, plan.run_args, recipe.frozen, recipe.resumable,
                                        args.resume_with_changes)
        if errors:
            _warn(f"checkpoints that do not load are set aside ({'; '.join(errors)}); resuming from {folder.name}")
        return plan
    raise UsageError(f"no checkpoint in {plan.output / CHECKPOINTS} loads ({'; '.join(errors)}); pass "
                     "--no-resume --overwrite to start over, or choose another folder")


def _check_count(folder: Path, checkpoint: Checkpoint, count: int, recipe: Recipe) -> None:
    if checkpoint.count != count:
        raise DamagedFile(f"{folder}: holds {recipe.unit} {checkpoint.count}, its name says {count}")
    total = (checkpoint.args or {}).get(recipe.total)
    if isinstance(total, int) and count > total:
        raise DamagedFile(f"{folder}: {recipe.unit} {count} is past the end of its run ({_flag(recipe.total)} {total})")


def check_resume(where: str, recorded: dict, current: dict, frozen, resumable, allow_changes: bool) -> dict[str, list]:
    """The changes a resume makes to the recorded arguments; refuses any in ``frozen``, the others unless allowed."""
    fixed = differences(recorded, current, frozen)
    if fixed:
        raise UsageError(f"{where} cannot resume with {describe(fixed)}: the checkpoint's weights cannot be "
                         "loaded with these (other shapes or parameter groups). Use another --output, or "
                         "--no-resume --overwrite to start over")
    changes = differences(recorded, current, resumable)
    if changes and not allow_changes:
        raise UsageError(f"resuming {where} with other arguments: {describe(changes)}. Pass "
                         "--resume-with-changes to continue with the new values, repeat the recorded ones, "
                         "or use --no-resume --overwrite to start over")
    return changes


def prepare_folder(plan: RunPlan, record: dict) -> None:
    """On the main process: delete a replaced run, set aside unreadable checkpoints, write the record."""
    output, recipe = plan.output, plan.recipe
    for path in plan.wipe or []:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name != LOCK_FILE:   # this run's own lock
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (output / CHECKPOINTS).rmdir()   # when empty
    output.mkdir(parents=True, exist_ok=True)
    for folder in plan.unreadable:
        set_aside = folder.with_name(folder.name + UNREADABLE)
        shutil.rmtree(set_aside, ignore_errors=True)
        os.replace(folder, set_aside)
    if plan.checkpoint is None:
        (output / LOG_FILE).unlink(missing_ok=True)
    truncate_log(output, plan.count, recipe.log_key)
    history = list(plan.history) if plan.checkpoint is not None else []
    if plan.changes:
        history.append({f"at_{recipe.unit}": plan.count, "changes": plan.changes})
    write_atomic(output / ARGS_FILE, json.dumps({**record, "resumed_with_changes": history}, indent=1,
                                                default=str) + "\n")


# ----------------------------------------------------------------------------------------
# Writes
# ----------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replaces ``path`` in one step: the old text or the new, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def save_checkpoint(output: Path, recipe: Recipe, count: int, state, keep: int) -> Path:
    """Writes checkpoints/<prefix>-<count> so that it exists only complete; keeps the newest ``keep`` (all when 0)."""
    folder = output / CHECKPOINTS / f"{recipe.prefix}-{count}"
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    recipe.save(tmp, state)
    for path in sorted(tmp.rglob("*"), key=lambda p: p.is_dir()) + [tmp]:   # files, then their folders
        _fsync(path)
    if folder.exists():      # a checkpoint of the same count that this run did not resume from
        _retire(folder)
    os.replace(tmp, folder)  # the one step in which the checkpoint appears
    _fsync(folder.parent)
    if keep > 0:
        for _, old in checkpoints(output, recipe)[keep:]:
            if old != folder:
                _retire(old)
    return folder


def _retire(folder: Path) -> None:
    """Deletes a checkpoint: gone from the list in one rename, then removed (a crash leaves ``*.old``)."""
    old = folder.with_name(folder.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    os.replace(folder, old)
    shutil.rmtree(old)


def truncate_log(output: Path, count: int, key: str) -> None:
    """Keeps the log rows whose ``key`` is at most ``count`` (the checkpoint resumed from): rows written after it
    are trained again. Drops unreadable lines (an interrupted write)."""
    path = output / LOG_FILE
    if not path.exists():
        return
    rows, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            value = json.loads(line)[key]
            keep = isinstance(value, int) and value <= count
        except (ValueError, TypeError, KeyError):
            dropped += bool(line.strip())
            continue
        if keep:
            rows.append(line)
    if dropped:
        _warn(f"{path}: dropped {dropped} unreadable line(s) (an interrupted write)")
    write_atomic(path, "".join(row + "\n" for row in rows))


def read_log(output: Path) -> list[dict]:
    """The log rows; a line cut short by an interruption is skipped."""
    rows = []
    for line in (output / LOG_FILE).read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
