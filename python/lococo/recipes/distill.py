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
``log.csv``, ``loss.png`` and ``checkpoint/`` (compressor, optimizers, sequences done and the
arguments that matter) from which a run resumes. One run per folder, with `lococo train`'s rule: a
resume with other arguments that matter is refused, naming them, unless --resume-with-changes
(those that fix the compressor's geometry are refused even then); --no-resume into a folder that
holds a run, or over a compressor that no run wrote, is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import time
from pathlib import Path

DEFAULT_LR = 1e-2

# Arguments that fix the compressor (its geometry, its start): a resume cannot change them.
FROZEN = ("model", "num_slots", "rho", "kernel_size", "chunk_size", "beta", "num_local", "slot_bias",
          "alpha_init", "init_std", "init_from")
# Arguments that change what the rest of the run does: a resume changes them only when asked.
RESUMABLE_CHANGES = ("docs", "split_file", "max_docs", "dtype", "seq_len", "sequences", "batch_size",
                     "update_every", "lr", "warmup", "alpha_range", "max_grad_norm", "seed")
CHECKPOINT = "checkpoint"
RUN_FILES = ("train_args.json", "log.jsonl", "log.csv", "loss.png", "lococo_config.json",
             "lococo_compressor.safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import run_folder
    from .argtypes import fraction, non_negative_int, positive_int, positive_real
    from .train import add_model_and_compressor_arguments

    lococo = add_model_and_compressor_arguments(
        parser, dtype_help="dtype of the frozen LLM's forward (the replay runs in float32)",
        compressor_group="compressor (ignored when resuming or with --init-from)", alpha_init=0.0, init_std=0.05)
    lococo.add_argument("--no-slot-bias", dest="slot_bias", action="store_false",
                        help="no learned attention logit per fused slot (the paper's semantics)")
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
    opt.add_argument("--seed", type=non_negative_int, default=0)
    out = parser.add_argument_group("logging and checkpoints")
    out.add_argument("--compare-every", type=non_negative_int, default=4,
                     help="every N sequences, also measure H2O's error on the same sequence (0: never)")
    out.add_argument("--save-every", type=positive_int, default=4, help="checkpoint every N sequences")
    run_folder.add_arguments(out)
    out.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def validate(args) -> None:
    """Checks across arguments, before the model loads."""
    from pathlib import Path

    from ..config import LoCoCoConfig
    from .argtypes import UsageError, check_writable

    if args.init_from is None:
        try:
            LoCoCoConfig(num_slots=args.num_slots, rho=args.rho, beta=args.beta, kernel_size=args.kernel_size,
                         num_local=args.num_local, alpha_init=args.alpha_init, init_std=args.init_std,
                         chunk_size=args.chunk_size, slot_bias=args.slot_bias)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if args.seq_len <= args.num_slots + args.beta + args.chunk_size:
            raise UsageError(f"--seq-len {args.seq_len} never compresses: it must exceed M + beta + B = "
                             f"{args.num_slots + args.beta + args.chunk_size}")
    for path in args.docs or []:
        if not Path(path).is_file():
            raise UsageError(f"--docs {path}: no such file")
    check_writable(Path(args.output), "--output")


# ----------------------------------------------------------------------------------------
# The teacher: one full-cache forward records every layer's q, k, v and attention output
# ----------------------------------------------------------------------------------------

CAPTURE = "lococo_capture"
_records: dict[int, tuple] = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _records[module.layer_idx] = (query, key, value, output)
    return output, weights


def register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE, _capture_attention)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)


def teacher_records(model, ids):
    """{layer: (q [b, heads, T, d], k [b, kv, T, d], v, out [b, T, heads, d])} of a full-cache forward."""
    import torch

    _records.clear()
    with torch.no_grad():
        model.model(input_ids=ids, use_cache=False)
    records = dict(_records)
    _records.clear()
    return records


# ----------------------------------------------------------------------------------------
# One layer's LoCoCo recurrence on the teacher's tensors
# ----------------------------------------------------------------------------------------

def replay_layer(layer_compressor, config, record, attention_module, *, alpha: float | None = None,
                 lookahead: bool = False, step_every: int = 0, on_update=None) -> tuple[float, int]:
    """The LoCoCo cache of one layer over a recorded sequence, chunk by chunk, as at inference.

    The cache layer is ``LoCoCoLayer`` itself and the attention is ``biased_attention`` (which the
    scored attention functions use too), so that training sees exactly what generation will. Returns
    (sum over compressed chunks of the relative output error, number of such chunks). With
    ``step_every`` > 0 the loss is back-propagated after every chunk and ``on_update()`` is called
    every ``step_every`` compressed chunks (and once at the end). ``alpha`` replaces the layer's blend
    and drops its slot logits (alpha = 0 is H2O's top-M selection with the same trigger and scores).
    ``lookahead`` compresses with the scores that the coming chunk's own queries give the stored entries
    instead of the previous chunk's: an oracle that no cache can run, the best a one-chunk selection can
    do (``benchmarks/layer_error.py``).
    """
    import torch

    from ..hf.attention import biased_attention
    from ..hf.caches import LoCoCoLayer

    query, key, value, target = (t.float() for t in record)
    b, heads, total, d = query.shape
    w_o = attention_module.o_proj.weight.float()
    target = target.reshape(b, total, heads * d)

    if alpha is not None:  # a frozen copy at this alpha, without slot logits
        layer_compressor = copy.deepcopy(layer_compressor).requires_grad_(False)
        layer_compressor.alpha.fill_(alpha)
        layer_compressor.slot_logit = None
    layer = LoCoCoLayer(layer_compressor, config)
    error_sum, compressed_chunks, pending = 0.0, 0, 0
    train = step_every > 0
    for start in range(0, total, config.chunk_size):
        stop = min(total, start + config.chunk_size)
        new_keys, new_values = key[:, :, start:stop], value[:, :, start:stop]
        if lookahead and layer._will_compress():
            with torch.no_grad():
                _, _, ahead = biased_attention(attention_module, query[:, :, start:stop],
                                               torch.cat([layer.keys, new_keys], -2),
                                               torch.cat([layer.values, new_values], -2), None, layer.logit_bias,
                                               scaling=attention_module.scaling)
            layer.record_scores(ahead[..., :layer.stored_length])
        with torch.set_grad_enabled(train and layer._will_compress()):
            keys, values = layer.update(new_keys, new_values)
            # no mask: every stored entry visible, the new ones causal (bottom-right aligned)
            out, _, scores = biased_attention(attention_module, query[:, :, start:stop], keys, values, None,
                                              layer.logit_bias, scaling=attention_module.scaling)
            layer.record_scores(scores)
            if layer.num_compressions:
                reference = target[:, start:stop] @ w_o.T
                out = out.reshape(b, stop - start, heads * d) @ w_o.T
                error = (out - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-12)
                if train and error.requires_grad:
                    error.backward()
                    pending += 1
                    if pending == step_every:
                        on_update()
                        pending = 0
                error_sum += float(error.detach())
                compressed_chunks += 1
        layer.detach_()
    if train and pending:
        on_update()
    return error_sum, compressed_chunks


# ----------------------------------------------------------------------------------------
# Checkpoint, logs
# ----------------------------------------------------------------------------------------

def run_arguments(args) -> dict:
    """The arguments that matter to a run, as plain JSON values."""
    return json.loads(json.dumps({name: getattr(args, name) for name in FROZEN + RESUMABLE_CHANGES}, default=str))


def _wipe(output: Path) -> None:
    import shutil

    for name in RUN_FILES:
        (output / name).unlink(missing_ok=True)
    for name in (CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".old"):
        shutil.rmtree(output / name, ignore_errors=True)


def open_folder(args) -> dict[str, list] | None:
    """Checks --output before the model loads: the changes a resume makes, or None for a new run (folder emptied)."""
    from . import run_folder
    from .argtypes import UsageError

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")
    current = run_arguments(args)
    progress = output / CHECKPOINT / "progress.json"
    if run_folder.holds_foreign_compressor(output) and not progress.is_file():
        if not args.overwrite:
            raise UsageError(f"--output {output} holds a compressor that no training run in this folder wrote; "
                             "pass --overwrite to replace it, or choose another folder")
        _wipe(output)
        return None
    if not run_folder.holds_run(output) and not progress.is_file():
        return None
    if args.no_resume:
        if not args.overwrite:
            raise UsageError(f"--output {output} holds a distill run; --no-resume would mix two runs in one "
                             "folder: pass --overwrite as well to delete it and start over, or choose another folder")
        _wipe(output)
        return None
    recorded_file = run_folder.recorded_arguments(output, FROZEN + RESUMABLE_CHANGES)
    if not progress.is_file():   # a run that stopped before its first checkpoint: start it again if it is the same
        changed = run_folder.differences(recorded_file or {}, current, FROZEN + RESUMABLE_CHANGES)
        if recorded_file is None or changed:
            raise UsageError(f"--output {output} holds another run that has no checkpoint"
                             + (f" ({run_folder.describe(changed)})" if recorded_file else "")
                             + "; pass --no-resume --overwrite to delete it, or choose another folder")
        _wipe(output)
        return None
    try:
        saved = json.loads(progress.read_text())
        where = f"{output / CHECKPOINT} (sequence {int(saved['sequences'])})"
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{progress} does not load; pass --no-resume --overwrite to start over") from None
    recorded = saved.get("args") or recorded_file   # checkpoints before the arguments were stored in them
    if recorded is None:
        if not args.resume_with_changes:
            raise UsageError(f"the arguments that {where} was trained with are not recorded; pass "
                             "--resume-with-changes to resume it with these, or --no-resume --overwrite")
        return {}
    return run_folder.check_resume(where, recorded, current, FROZEN, RESUMABLE_CHANGES, args.resume_with_changes)


def write_record(args, output: Path, done: int, changes: dict[str, list] | None) -> None:
    """train_args.json (every argument, and the changes of each resume); the log cut back to the checkpoint."""
    from . import run_folder

    history = []
    if changes is not None:
        try:
            history = json.loads((output / "train_args.json").read_text()).get("resumed_with_changes", [])
        except (OSError, ValueError, AttributeError):
            history = []
        if changes:
            history.append({"at_sequence": done, "changes": changes})
    record = {k: v for k, v in vars(args).items() if k not in ("func", "validate")}
    (output / "train_args.json").write_text(json.dumps({**record, "resumed_with_changes": history},
                                                       indent=2, default=str) + "\n")
    run_folder.truncate_log(output, done, key="sequences")


def save_checkpoint(output: Path, compressor, optimizers, sequences: int, run_args: dict) -> None:
    import shutil

    import torch

    folder = output / CHECKPOINT
    tmp = output / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    compressor.save_pretrained(tmp / "compressor")
    # optimizer states hold only tensors and numbers: saved as tensors, loaded with weights_only
    torch.save([opt.state_dict() for opt in optimizers], tmp / "optimizers.pt")
    (tmp / "progress.json").write_text(json.dumps({"sequences": sequences, "args": run_args}))
    if folder.exists():
        old = output / "checkpoint.old"
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


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


def build_compressor(args, model):
    """The compressor and its per-layer optimizers: from the run's checkpoint, from --init-from, or new.

    Returns (compressor, optimizers, sequences already done).
    """
    import torch

    from ..compressor import LoCoCoCompressor
    from ..config import LoCoCoConfig

    ckpt = Path(args.output) / CHECKPOINT
    done = 0
    if ckpt.is_dir():
        compressor = LoCoCoCompressor.from_pretrained(ckpt / "compressor", model=model, dtype=torch.float32)
        done = json.loads((ckpt / "progress.json").read_text())["sequences"]
    elif args.init_from:
        compressor = LoCoCoCompressor.from_pretrained(args.init_from, model=model, dtype=torch.float32)
    else:
        compressor = LoCoCoCompressor.for_model(model, LoCoCoConfig(
            num_slots=args.num_slots, rho=args.rho, beta=args.beta, kernel_size=args.kernel_size,
            num_local=args.num_local, alpha_init=args.alpha_init, init_std=args.init_std,
            chunk_size=args.chunk_size, slot_bias=args.slot_bias))
    compressor.requires_grad_(True)
    optimizers = [torch.optim.AdamW(layer.parameters(), lr=args.lr, weight_decay=0.0) for layer in compressor.layers]
    if ckpt.is_dir():
        for opt, state in zip(optimizers, torch.load(ckpt / "optimizers.pt", weights_only=True)):
            opt.load_state_dict(state)
    return compressor, optimizers, done


def train_batch(args, model, compressor, optimizers, ids, lr: float, compare: bool) -> dict:
    """One teacher forward, then every layer's replay with its updates; the log row's numbers."""
    import torch

    started = time.perf_counter()
    records = teacher_records(model, ids)
    teacher_seconds = time.perf_counter() - started
    errors, h2o_errors = [], []
    for index, (layer, opt) in enumerate(zip(compressor.layers, optimizers)):
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

        total, count = replay_layer(layer, compressor.config, records[index], attn, step_every=args.update_every,
                                    on_update=update)
        errors.append(total / max(1, count))
        if compare:
            with torch.no_grad():
                total, count = replay_layer(layer, compressor.config, records[index], attn, alpha=0.0)
            h2o_errors.append(total / max(1, count))
        records[index] = None
    row = {"error": sum(errors) / len(errors), "layer_error": errors, "lr": lr,
           "seconds": time.perf_counter() - started, "teacher_seconds": teacher_seconds,
           "alpha": [float(layer.alpha.detach()) for layer in compressor.layers]}
    if compare:
        row.update(h2o_error=sum(h2o_errors) / len(h2o_errors), layer_h2o_error=h2o_errors)
        row["ratio"] = row["error"] / row["h2o_error"]
    return row


def main(args) -> int:
    """`lococo distill`, with arguments that ``validate`` has checked."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm.auto import tqdm

    from . import run_folder
    from .train import TokenWindows, load_llm, training_documents

    output = Path(args.output)
    changes = open_folder(args)
    output.mkdir(parents=True, exist_ok=True)
    run_args = run_arguments(args)
    torch.manual_seed(args.seed)
    args.rope_scaling = None
    model, tokenizer = load_llm(args)
    model.eval()
    register_capture()
    model.set_attn_implementation(CAPTURE)
    compressor, optimizers, done = build_compressor(args, model)
    write_record(args, output, done, changes)
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
                save_checkpoint(output, compressor, optimizers, done, run_args)
                write_csv_and_plot(output)
    bar.close()
    compressor.save_pretrained(output)
    write_csv_and_plot(output)
    print(f"lococo distill: {done} sequences of {args.seq_len} tokens; compressor in {output}")
    return 0
