"""Layer-local training of LoCoCo compressors: each layer's attention output against the full cache's.

Backprop through the whole LLM for every chunk of every sequence is what makes the original recipe
expensive. Here the frozen LLM runs once per batch of sequences, with the full cache, and records for
every layer the queries and keys (after RoPE), the values and the attention output. Each layer then
replays the LoCoCo cache on its own recorded keys and values, chunk by chunk exactly as the cache
does at inference (compress when more than M + beta entries are stored, with the scores of the
previous chunk's attention; append; attend), and its compressor is trained so that every chunk's
attention output, through the layer's frozen output projection, matches the full cache's:

    loss(layer, chunk) = || (O_lococo - O_full) W_o^T ||^2 / || O_full W_o^T ||^2

A layer's loss reaches only its own compressor, so the layers train one after the other, each with
its own optimizer updates, and no gradient touches the LLM. The cache is detached after every chunk
(one-chunk truncated backprop, as in the original recipe), so each chunk trains the compression that
built the slots it attends to. Sequences as long as the evaluation horizon (8K tokens) make the
compressor learn to re-fuse its own slots hundreds of times, instead of extrapolating beyond the
training length.

alpha is projected onto [0, 1] after every update (``--alpha-range clamp``, the default): outside
it the blend extrapolates beyond the one-hot pick and the softmax mix, and re-fusing such slots
again and again diverges. ``--alpha-range free`` keeps the original, unclamped alpha.

Every ``--compare-every`` sequences the same recurrence also runs with alpha = 0 (the top-M
selection of H2O with the same trigger and scores) on the same sequence, and the log records both
errors: the learned compressor's error relative to H2O's is the quantity this training lowers.

Writes into --output: the compressor (``save_pretrained``), ``train_args.json``, ``log.jsonl``,
``log.csv``, ``loss.png`` and ``checkpoints/sequence-N/`` (compressor, optimizers, sequences done and
the arguments that matter) from which a run resumes. The run folder follows `lococo train`'s rules
(``lococo.recipes.run_folder``): one run per folder, held by one process at a time; atomic
checkpoints; a resume with other arguments that matter is refused, naming them, unless
--resume-with-changes (those that fix the compressor's geometry are refused even then);
--no-resume into a folder that holds a run, or over a compressor that no run wrote, is refused
unless --overwrite, which deletes only what a run writes.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path

from . import run_folder
from .replay import CAPTURE, register_capture, replay, teacher_records

DEFAULT_LR = 1e-2

# Arguments that fix the compressor (its geometry, its start): a resume cannot change them.
FROZEN = ("model", "num_slots", "budgets", "rho", "kernel_size", "chunk_size", "beta", "num_local", "slot_bias",
          "alpha_init", "init_std", "init_from", "kv_bits", "kv_group", "kv_key_axis", "kv_format")
# Arguments that change what the rest of the run does: a resume changes them only when asked.
RESUMABLE_CHANGES = ("docs", "split_file", "max_docs", "dtype", "seq_len", "sequences", "batch_size",
                     "update_every", "lr", "warmup", "alpha_range", "max_grad_norm", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import run_folder
    from .argtypes import add_slot_storage, fraction, int_at_least, non_negative_int, positive_int, positive_real
    from .train import add_model_and_compressor_arguments

    lococo = add_model_and_compressor_arguments(
        parser, dtype_help="dtype of the frozen LLM's forward (the replay runs in float32)",
        compressor_group="compressor (ignored when resuming or with --init-from)", alpha_init=0.0, init_std=0.05)
    lococo.add_argument("--no-slot-bias", dest="slot_bias", action="store_false",
                        help="no learned attention logit per fused slot (the paper's semantics)")
    lococo.add_argument("--budgets", default=None, metavar="FILE",
                        help="per-layer slots instead of --num-slots everywhere: a budget file (`lococo calibrate`) "
                             "or a shipped name; each layer trains at its own M")
    add_slot_storage(parser)   # the compressor trains with its slots rounded as they will be stored (straight-through)
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--init-from", default=None, metavar="FOLDER",
                     help="start from this compressor (a folder or a shipped name; same geometry), not a fresh one")
    opt.add_argument("--seq-len", type=positive_int, default=8192, help="tokens per training sequence")
    opt.add_argument("--sequences", type=positive_int, default=128, help="training sequences in all")
    opt.add_argument("--batch-size", type=positive_int, default=1, help="sequences per teacher forward")
    opt.add_argument("--update-every", type=positive_int, default=4,
                     help="compressed chunks per optimizer update of a layer")
    opt.add_argument("--lr", type=positive_real, default=DEFAULT_LR, help="peak learning rate")
    opt.add_argument("--warmup", type=fraction, default=0.05, help="fraction of the run with a linear warm-up")
    opt.add_argument("--alpha-range", choices=["clamp", "free"], default="clamp",
                     help="clamp: alpha projected onto [0, 1] after every update; free: the original")
    opt.add_argument("--max-grad-norm", type=positive_real, default=1.0, help="per-layer gradient clipping")
    opt.add_argument("--seed", type=int_at_least(0, 2**32 - 1), default=0, help="seed of the window order")
    out = parser.add_argument_group("logging and checkpoints")
    out.add_argument("--compare-every", type=non_negative_int, default=4,
                     help="every N sequences, also measure H2O's error on the same sequence (0: never)")
    out.add_argument("--save-every", type=positive_int, default=4, help="checkpoint every N sequences")
    run_folder.add_arguments(out)
    out.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def validate(args) -> None:
    """Checks across arguments, before the model loads."""
    from pathlib import Path

    from .argtypes import UsageError, check_writable

    if args.init_from is None:
        try:
            config = new_config(args)
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        if args.seq_len <= config.max_slots + args.beta + args.chunk_size:
            raise UsageError(f"--seq-len {args.seq_len} never compresses: it must exceed M + beta + B = "
                             f"{config.max_slots + args.beta + args.chunk_size}"
                             + (" (the largest M of --budgets)" if config.per_layer else ""))
    for path in args.docs or []:
        if not Path(path).is_file():
            raise UsageError(f"--docs {path}: no such file")
    check_writable(Path(args.output), "--output")


# ----------------------------------------------------------------------------------------
# One layer's LoCoCo recurrence on the teacher's tensors (lococo.recipes.replay)
# ----------------------------------------------------------------------------------------

def replay_layer(layer_compressor, config, record, attention_module, *, alpha: float | None = None,
                 lookahead: bool = False, step_every: int = 0, on_update=None) -> tuple[float, int]:
    """The LoCoCo cache of one layer over a recorded sequence, chunk by chunk, as at inference (``replay``).

    ``config`` is the layer's (``LoCoCoConfig.layer(i)``; a uniform config serves every layer). Returns
    (sum over compressed chunks of the relative output error, number of such chunks). ``alpha`` replaces
    the layer's blend and drops its slot logits (alpha = 0 is H2O's top-M selection with the same trigger
    and scores); ``lookahead``, ``step_every`` and ``on_update`` as ``replay.replay``.
    """
    from ..hf.caches import LoCoCoLayer

    if alpha is not None:  # a frozen copy at this alpha, without slot logits
        layer_compressor = copy.deepcopy(layer_compressor).requires_grad_(False)
        layer_compressor.alpha.fill_(alpha)
        layer_compressor.slot_logit = None
    result = replay(LoCoCoLayer(layer_compressor, config), record, attention_module, config.chunk_size,
                    lookahead=lookahead, step_every=step_every, on_update=on_update)
    return result.error_sum, result.compressed_chunks


# ----------------------------------------------------------------------------------------
# Checkpoint, logs
# ----------------------------------------------------------------------------------------

CHECKPOINT_FILES = ("compressor/lococo_config.json", "compressor/lococo_compressor.safetensors", "optimizers.pt",
                    "progress.json")


def save_checkpoint_files(folder: Path, state) -> None:
    """A checkpoint: the compressor, every layer's optimizer state (tensors and numbers, loaded with
    weights_only) and ``progress.json`` (sequences done, the arguments that matter)."""
    import torch

    compressor, optimizers, sequences, run_args = state
    compressor.save_pretrained(folder / "compressor")
    torch.save([opt.state_dict() for opt in optimizers], folder / "optimizers.pt")
    (folder / "progress.json").write_text(json.dumps({"sequences": sequences, "args": run_args}))


def load_checkpoint_files(folder: Path) -> run_folder.Checkpoint:
    """(compressor, optimizer states) of a checkpoint, every file checked (DamagedFile naming the file and field)."""
    import torch

    from ..compressor import LoCoCoCompressor

    path = folder / "progress.json"
    progress = run_folder.read_json(path)
    done = run_folder.get_count(path, progress, "sequences")
    recorded = run_folder.get(path, progress, "args", dict) if "args" in progress else None  # older: not recorded
    compressor = LoCoCoCompressor.from_pretrained(folder / "compressor", dtype=torch.float32)
    states = run_folder.load_tensors(folder / "optimizers.pt")
    layers = len(compressor.compressed_layers())
    if not (isinstance(states, list) and len(states) == layers
            and all(isinstance(s, dict) and {"state", "param_groups"} <= s.keys() for s in states)):
        raise run_folder.DamagedFile(f"{folder / 'optimizers.pt'}: expected {layers} optimizer "
                                     "states, one per compressed layer of the compressor")
    return run_folder.Checkpoint(done, recorded, (compressor, states))


DISTILL = run_folder.Recipe(
    unit="sequence", log_key="sequences", total="sequences", prefix="sequence", frozen=FROZEN,
    resumable=RESUMABLE_CHANGES, files=CHECKPOINT_FILES, save=save_checkpoint_files, load=load_checkpoint_files,
    legacy=("checkpoint", "checkpoint.old", "checkpoint.tmp"))   # the one checkpoint of earlier versions


def save_checkpoint(output: Path, compressor, optimizers, sequences: int, run_args: dict, keep: int) -> None:
    run_folder.save_checkpoint(output, DISTILL, sequences, (compressor, optimizers, sequences, run_args), keep)


def write_csv_and_plot(output: Path) -> None:
    from . import run_folder

    rows = run_folder.read_log(output)
    if not rows:
        return
    with open(output / "log.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sequences", "tokens", "error", "h2o_error", "ratio", "lr", "seconds", "alpha_mean"])
        for r in rows:
            writer.writerow([r["sequences"], r["tokens"], r["error"], r.get("h2o_error", ""), r.get("ratio", ""),
                             r["lr"], r["seconds"], sum(r["alpha"]) / len(r["alpha"])])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .train import save_with_alpha_panel

    fig, (ax_err, ax_alpha) = plt.subplots(1, 2, figsize=(11, 4))
    ax_err.plot([r["tokens"] for r in rows], [r["error"] for r in rows], lw=1, label="LoCoCo")
    compared = [r for r in rows if "h2o_error" in r]
    ax_err.plot([r["tokens"] for r in compared], [r["h2o_error"] for r in compared], "o-", lw=1, ms=3,
                label="H2O (alpha = 0), same sequence")
    ax_err.set(xlabel="training tokens", ylabel="relative attention-output error (mean over layers)",
               title="layer-local loss")
    ax_err.legend()
    ax_err.grid(alpha=0.3)
    save_with_alpha_panel(fig, ax_alpha, [r["tokens"] for r in rows], rows, "training tokens", output / "loss.png")


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def lr_at(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of the run, then linear decay to 0."""
    if warmup > 0 and progress < warmup:
        return peak * (progress + 1e-9) / warmup
    return peak * max(0.0, 1.0 - progress) / max(1e-9, 1.0 - warmup)


def new_config(args):
    """The config of a fresh compressor: --num-slots in every layer, or the per-layer slots of --budgets."""
    from ..budgets import Budgets
    from ..config import LoCoCoConfig
    from .argtypes import slot_storage

    slots = args.num_slots if args.budgets is None else Budgets.load(args.budgets).num_slots
    return LoCoCoConfig(num_slots=slots, rho=args.rho, beta=args.beta, kernel_size=args.kernel_size,
                        num_local=args.num_local, alpha_init=args.alpha_init, init_std=args.init_std,
                        chunk_size=args.chunk_size, slot_bias=args.slot_bias,
                        quantization=slot_storage(args, None) or None)


def build_compressor(args, model, plan: run_folder.RunPlan):
    """The compressor and its per-layer optimizers: from the checkpoint ``plan`` resumes, from --init-from, or new.

    Returns (compressor, optimizers, sequences already done).
    """
    import torch

    from ..compressor import LoCoCoCompressor
    from .argtypes import UsageError

    if plan.state is not None:
        compressor, states = plan.state
        try:
            compressor.check_model(model)
        except ValueError as exc:
            raise UsageError(f"{plan.checkpoint}: {exc}") from None
        compressor.to(next(model.parameters()).device)
    elif args.init_from:
        compressor = LoCoCoCompressor.from_pretrained(args.init_from, model=model, dtype=torch.float32)
        if args.kv_bits is not None:   # its weights, trained on for this storage
            from .argtypes import slot_storage

            compressor.config = dataclasses.replace(compressor.config, quantization=slot_storage(args, None) or None)
    else:
        try:
            compressor = LoCoCoCompressor.for_model(model, new_config(args))
        except ValueError as exc:
            raise UsageError(f"--budgets {args.budgets}: {exc}") from None
    compressor.requires_grad_(True)
    # one per compressed layer (a mixed model's sliding-window layers have nothing to learn)
    optimizers = [torch.optim.AdamW(compressor.layers[i].parameters(), lr=args.lr, weight_decay=0.0)
                  for i in compressor.compressed_layers()]
    if plan.state is not None:
        for opt, state in zip(optimizers, states):
            opt.load_state_dict(state)
        plan.state = None   # in the compressor and the optimizers now
    return compressor, optimizers, plan.count


def train_batch(args, model, compressor, optimizers, ids, lr: float, compare: bool) -> dict:
    """One teacher forward, then every layer's replay with its updates; the log row's numbers."""
    import torch

    started = time.perf_counter()
    records = teacher_records(model, ids)
    teacher_seconds = time.perf_counter() - started
    errors, h2o_errors = [], []
    for index, opt in zip(compressor.compressed_layers(), optimizers):
        layer = compressor.layers[index]
        attn = model.model.layers[index].self_attn
        for group in opt.param_groups:
            group["lr"] = lr

        def update(layer=layer, opt=opt):
            torch.nn.utils.clip_grad_norm_(layer.parameters(), args.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.alpha_range == "clamp":
                with torch.no_grad():
                    layer.alpha.clamp_(0.0, 1.0)

        total, count = replay_layer(layer, compressor.config.layer(index), records[index], attn,
                                    step_every=args.update_every,
                                    on_update=update)
        errors.append(total / max(1, count))
        if compare:
            with torch.no_grad():
                total, count = replay_layer(layer, compressor.config.layer(index), records[index], attn, alpha=0.0)
            h2o_errors.append(total / max(1, count))
        records[index] = None
    row = {"error": sum(errors) / len(errors), "layer_error": errors, "lr": lr,
           "seconds": time.perf_counter() - started, "teacher_seconds": teacher_seconds,
           "alpha": [float(compressor.layers[i].alpha.detach()) for i in compressor.compressed_layers()]}
    if compare:
        row.update(h2o_error=sum(h2o_errors) / len(h2o_errors), layer_h2o_error=h2o_errors)
        row["ratio"] = row["error"] / row["h2o_error"]
    return row


def main(args) -> int:
    """`lococo distill`, with arguments that ``validate`` has checked: the run, holding its folder's lock."""
    with run_folder.lock(Path(args.output)):
        return run(args)


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm.auto import tqdm

    from .train import TokenWindows, load_llm, training_documents

    output = Path(args.output)
    run_folder.recover(output, DISTILL)
    plan = run_folder.open_run(args, DISTILL, run_folder.run_arguments(args, DISTILL))
    run_args = plan.run_args
    torch.manual_seed(args.seed)
    args.rope_scaling = None
    model, tokenizer = load_llm(args)
    model.eval()
    register_capture()
    model.set_attn_implementation(CAPTURE)
    compressor, optimizers, done = build_compressor(args, model, plan)
    run_folder.prepare_folder(plan, {k: v for k, v in vars(args).items() if k not in ("func", "validate")})
    docs, read = training_documents(args, tokenizer)
    windows = TokenWindows(docs, read, tokenizer, args.seq_len, args.seed)

    bar = tqdm(total=args.sequences, initial=done, disable=args.no_progress, unit="seq")
    with open(output / run_folder.LOG_FILE, "a") as log:
        while done < args.sequences:
            batch = min(args.batch_size, args.sequences - done)
            ids = torch.stack([windows[done + i] for i in range(batch)])
            lr = lr_at((done + batch / 2) / args.sequences, args.lr, args.warmup)   # at the batch's midpoint
            compare = args.compare_every > 0 and done % args.compare_every == 0
            row = train_batch(args, model, compressor, optimizers, ids, lr, compare)
            done += batch
            if not all(math.isfinite(e) for e in row["layer_error"]):
                raise SystemExit(f"lococo distill: the loss became {row['error']} at sequence {done}; lower --lr")
            log.write(json.dumps({"sequences": done, "tokens": done * args.seq_len, **row}) + "\n")
            log.flush()
            bar.update(batch)
            bar.set_postfix(error=f"{row['error']:.4f}", ratio=f"{row.get('ratio', float('nan')):.3f}")
            if done % args.save_every == 0 or done >= args.sequences:
                save_checkpoint(output, compressor, optimizers, done, run_args, args.keep_checkpoints)
                write_csv_and_plot(output)
    bar.close()
    compressor.save_pretrained(output)
    write_csv_and_plot(output)
    print(f"lococo distill: {done} sequences of {args.seq_len} tokens; compressor in {output}")
    return 0
