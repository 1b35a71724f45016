"""A training run's folder: its recorded arguments, its checkpoints, its log; one run per folder.

A folder holds one run. Its arguments are recorded in ``train_args.json`` and in every
checkpoint (``checkpoints/step-N/run_args.json`` next to ``state.pt``), so that a resume
compares the arguments it is given with the ones the checkpoint was trained with:

- the same: the run continues where the checkpoint left it;
- different in arguments that matter (``RESUMABLE_CHANGES``): refused, naming them, unless
  ``--resume-with-changes``; then the new values apply from the next update (learning rates
  and the schedule included) and the change is recorded in ``train_args.json``;
- different in arguments that fix the trainable weights' shapes or groups (``FROZEN``):
  refused even then, since the checkpoint cannot be loaded into them.

``--no-resume`` into a folder that holds a run is refused unless ``--overwrite`` (which deletes
the run first), and so is writing a new run over a compressor that no run in the folder wrote.
Checkpoints are loaded with ``torch.load(weights_only=True)``: a run folder never executes
code. A checkpoint that does not load is set aside (renamed ``step-N.unreadable``) and the one
before it is used.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .argtypes import UsageError

ARGS_FILE = "train_args.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
CHECKPOINT_ARGS_FILE = "run_args.json"
CHECKPOINT_RE = re.compile(r"step-(\d+)$")
COMPRESSOR_FILES = ("lococo_config.json", "lococo_compressor.safetensors")  # save_pretrained's (no torch import here)
RUN_OUTPUTS = (ARGS_FILE, LOG_FILE, "log.csv", "loss.png", *COMPRESSOR_FILES)
RUN_FOLDERS = (CHECKPOINTS, "model")

# Arguments that decide the trainable tensors, their shapes or their optimizer groups: a
# checkpoint trained with other values cannot be loaded.
FROZEN = ("model", "dtype", "num_slots", "rho", "kernel_size", "lora", "lora_rank", "train_embed_norm")
# Arguments that change what the rest of the run does; a resume may change them only when asked.
RESUMABLE_CHANGES = ("docs", "split_file", "max_docs", "chunk_size", "beta", "num_local", "alpha_init",
                     "init_std", "chunks_per_seq", "steps", "batch_size", "grad_accum", "lr", "lr_embed_norm",
                     "lr_lora", "rope_scaling", "max_grad_norm", "seed", "world_size")
MATTERS = FROZEN + RESUMABLE_CHANGES


def add_arguments(group) -> None:
    """--no-resume, --resume-with-changes and --overwrite, as `lococo train` and `lococo distill` take them."""
    group.add_argument("--no-resume", action="store_true",
                       help="start a new run; refused when --output holds one, unless --overwrite")
    group.add_argument("--resume-with-changes", action="store_true",
                       help="resume although arguments that matter differ from the checkpoint's; the new "
                            "values apply from the next update")
    group.add_argument("--overwrite", action="store_true",
                       help="with --no-resume: delete the run in --output first; also allows replacing a "
                            "compressor that no run in --output wrote")


def run_arguments(args, world_size: int) -> dict:
    """The arguments that matter to a run, as plain JSON values."""
    values = {name: getattr(args, name) for name in MATTERS if name != "world_size"}
    return {**values, "world_size": world_size}


def differences(old: dict, new: dict, names) -> dict[str, list]:
    return {name: [old.get(name), new.get(name)] for name in names if old.get(name) != new.get(name)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def describe(changes: dict[str, list]) -> str:
    return ", ".join(f"{_flag(name)} {old!r} -> {new!r}" for name, (old, new) in changes.items())


def _warn(message: str) -> None:
    print(f"lococo: warning: {message}", file=sys.stderr, flush=True)


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(update, folder) of the complete checkpoints, newest first."""
    found = [(int(m.group(1)), p) for p in (output / CHECKPOINTS).glob("step-*")
             if (m := CHECKPOINT_RE.search(p.name)) and (p / STATE_FILE).is_file()]
    return sorted(found, reverse=True)


def holds_run(output: Path) -> bool:
    return (output / ARGS_FILE).is_file() or (output / LOG_FILE).is_file() or bool(checkpoints(output))


def holds_foreign_compressor(output: Path) -> bool:
    """A compressor that no training run in this folder wrote (a shipped or copied one)."""
    return any((output / name).exists() for name in COMPRESSOR_FILES) and not holds_run(output)


def load_checkpoint(folder: Path) -> tuple[dict, dict | None]:
    """(state, recorded run arguments or None) of a checkpoint; raises when it does not load."""
    import torch

    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    for key in ("step", "sequences", "trainable", "optimizer", "scheduler", "rng"):
        if key not in state:
            raise ValueError(f"{folder / STATE_FILE} has no {key!r} entry")
    args_path = folder / CHECKPOINT_ARGS_FILE
    return state, json.loads(args_path.read_text()) if args_path.is_file() else None


@dataclass
class RunPlan:
    """What ``open_run`` decided: start fresh (after deleting a run when ``wipe``) or resume."""

    output: Path
    run_args: dict
    wipe: bool = False
    checkpoint: Path | None = None
    state: dict | None = None       # the checkpoint's content, until the trainer has taken it
    step: int = 0                   # updates done by the checkpoint resumed from
    sequences: int = 0
    changes: dict[str, list] = field(default_factory=dict)
    unreadable: list[Path] = field(default_factory=list)


def open_run(args, world_size: int) -> RunPlan:
    """Decides from the folder and the arguments whether to start or resume; refuses what would lose or mix runs.

    Reads only; ``prepare_folder`` then changes the folder (on the main process).
    """
    output = Path(args.output)
    plan = RunPlan(output, run_arguments(args, world_size))
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")
    if holds_foreign_compressor(output):
        if not args.overwrite:
            raise UsageError(f"--output {output} holds a compressor that no training run in this folder wrote; "
                             "pass --overwrite to replace it, or choose another folder")
        plan.wipe = True
        return plan
    if not holds_run(output):
        return plan
    found = checkpoints(output)
    if args.no_resume:
        if not args.overwrite:
            what = f"checkpoints up to update {found[0][0]}" if found else "a log and recorded arguments"
            raise UsageError(f"--output {output} holds a training run ({what}); --no-resume would mix two runs "
                             "in one folder: pass --overwrite as well to delete it and start over, or choose "
                             "another folder")
        plan.wipe = True
        return plan
    if found:
        return _resume(args, plan, found)
    # a run that stopped before its first checkpoint: nothing to resume, so start it again if it is the same
    recorded = recorded_arguments(output)
    changed = differences(recorded or {}, plan.run_args, MATTERS)
    if recorded is None or changed:
        raise UsageError(f"--output {output} holds another run that has no checkpoint"
                         + (f" ({describe(changed)})" if recorded else "")
                         + "; pass --no-resume --overwrite to delete it, or choose another folder")
    plan.wipe = True
    return plan


def _resume(args, plan: RunPlan, found: list[tuple[int, Path]]) -> RunPlan:
    """The newest checkpoint that loads, checked against the arguments; the ones that do not load are set aside."""
    errors = []
    for _, folder in found:
        try:
            state, recorded = load_checkpoint(folder)
        except Exception as exc:  # a truncated or foreign file: any failure means "not usable"
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            errors.append(f"{folder.name}: {type(exc).__name__}: {first_line}")
            plan.unreadable.append(folder)
            continue
        plan.checkpoint, plan.state = folder, state
        plan.step, plan.sequences = int(state["step"]), int(state["sequences"])
        _check_changes(args, plan, recorded if recorded is not None else recorded_arguments(plan.output))
        if errors:
            _warn(f"checkpoints that do not load are set aside ({'; '.join(errors)}); resuming from {folder.name}")
        return plan
    raise UsageError(f"no checkpoint in {plan.output / CHECKPOINTS} loads ({'; '.join(errors)}); pass "
                     "--no-resume --overwrite to start over, or choose another folder")


def recorded_arguments(output: Path, names=MATTERS) -> dict | None:
    """The values of ``names`` in the folder's recorded arguments, None when there is no readable record."""
    try:
        recorded = json.loads((output / ARGS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {name: recorded.get(name) for name in names} if isinstance(recorded, dict) else None


def _check_changes(args, plan: RunPlan, recorded: dict | None) -> None:
    where = f"{plan.checkpoint} (update {plan.step})"
    if recorded is None:
        if not args.resume_with_changes:
            raise UsageError(f"the arguments that {where} was trained with are not recorded; pass "
                             "--resume-with-changes to resume it with these, or --no-resume --overwrite")
        plan.changes = {}
        return
    plan.changes = check_resume(where, recorded, plan.run_args, FROZEN, RESUMABLE_CHANGES, args.resume_with_changes)


def check_resume(where: str, recorded: dict, current: dict, frozen, resumable, allow_changes: bool) -> dict[str, list]:
    """The changes a resume makes to the recorded arguments; refuses any in ``frozen``, and the others unless allowed.

    Shared by `lococo train` and `lococo distill`, whose checkpoints differ but whose rule is the same.
    """
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
    output = plan.output
    if plan.wipe:
        for name in RUN_OUTPUTS:
            (output / name).unlink(missing_ok=True)
        for name in RUN_FOLDERS:
            shutil.rmtree(output / name, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)
    for folder in plan.unreadable:
        set_aside = folder.with_name(folder.name + ".unreadable")
        shutil.rmtree(set_aside, ignore_errors=True)
        os.replace(folder, set_aside)
    if plan.checkpoint is None:
        (output / LOG_FILE).unlink(missing_ok=True)
    truncate_log(output, plan.step)
    history = []
    if plan.checkpoint is not None:
        try:
            history = json.loads((output / ARGS_FILE).read_text()).get("resumed_with_changes", [])
        except (OSError, ValueError, AttributeError):
            history = []
        if plan.changes:
            history.append({"at_update": plan.step, "changes": plan.changes})
    (output / ARGS_FILE).write_text(json.dumps({**record, "resumed_with_changes": history},
                                               indent=1, default=str) + "\n")


def truncate_log(output: Path, step: int, key: str = "step") -> None:
    """Keeps the log rows whose ``key`` is at most ``step`` (the checkpoint resumed from): rows written after it
    are trained again. Drops unreadable lines (an interrupted write)."""
    path = output / LOG_FILE
    if not path.exists():
        return
    rows, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = row[key] <= step
        except (ValueError, TypeError, KeyError):
            dropped += bool(line.strip())
            continue
        if keep:
            rows.append(line)
    if dropped:
        _warn(f"{path}: dropped {dropped} unreadable line(s) (an interrupted write)")
    path.write_text("".join(row + "\n" for row in rows))


def read_log(output: Path) -> list[dict]:
    """The log rows; a line cut short by an interruption is skipped."""
    rows = []
    for line in (output / LOG_FILE).read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def save_checkpoint(output: Path, step: int, sequences: int, run_args: dict, trainable: dict, optimizer,
                    scheduler, keep: int) -> Path:
    """Writes checkpoints/step-N atomically; keeps the newest ``keep`` (all when 0)."""
    import torch

    folder = output / CHECKPOINTS / f"step-{step}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, "sequences": sequences, "trainable": trainable,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               tmp / STATE_FILE)
    (tmp / CHECKPOINT_ARGS_FILE).write_text(json.dumps(run_args, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # a checkpoint exists only once it is complete
    if keep > 0:
        for _, old in checkpoints(output)[keep:]:
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    return folder


def restore_rng(state: dict) -> None:
    import torch

    rng = state["rng"]
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
