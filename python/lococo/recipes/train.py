"""Train LoCoCo compressors on a frozen causal LM (the original recipe, docs/design.md#the-original-recipe).

Sequences of chunk_size * chunks_per_seq tokens are cut from the training documents and run
chunk by chunk through the compressing cache. Each chunk has its own loss and its own
backward; the cache is detached between chunks (one-chunk truncated backprop), so the loss of
a chunk trains the compression that built the slots it attends to. Trainable: every layer's
convolution and alpha; optionally the embeddings and norms, and LoRA (r=8 on q/k/v/o) with
linear RoPE scaling for context extension. AdamW without weight decay, one learning rate per
group, linear decay without warm-up, gradient accumulation.

Runs on one device as `lococo train ...` and on several with accelerate's data parallelism,
every process taking its own sequences: `accelerate launch --multi_gpu --num_processes N -m
lococo train ...` (or, on CPUs, `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m lococo
train ...`). An update takes batch_size * grad_accum * processes sequences.

Writes into --output: the compressor (`save_pretrained`), `model/` when LLM weights were
trained (LoRA merged), `log.jsonl` and `log.csv` (loss, learning rates, per-layer alpha),
`loss.png`, `train_args.json`, and `checkpoints/step-N/` (trainable weights, optimizer,
scheduler, data position, RNG) from which a run started with the same --output resumes.

One run per folder, held by one process at a time (see ``lococo.recipes.run_folder``): a resume
with other arguments that matter is refused, naming them, unless --resume-with-changes;
--no-resume into a folder that holds a run, and a new run over a compressor no run wrote, need
--overwrite, which deletes only what a run writes. Checkpoints are written atomically and load
with torch.load(weights_only=True): a run folder runs no code. Every number is checked before
the model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import run_folder
from .argtypes import (
    UsageError,
    add_assets_dir,
    finite_real,
    fraction,
    int_at_least,
    non_negative_int,
    odd_int,
    positive_int,
    positive_real,
)

DEFAULT_LR = {"compressor": 5e-2, "embed_norm": 2.5e-4, "lora": 5e-5}

# Arguments that decide the trainable tensors, their shapes or their optimizer groups: a
# checkpoint trained with other values cannot be loaded.
FROZEN = ("model", "dtype", "num_slots", "rho", "kernel_size", "lora", "lora_rank", "train_embed_norm")
# Arguments that change what the rest of the run does; a resume may change them only when asked.
RESUMABLE_CHANGES = ("docs", "split_file", "max_docs", "chunk_size", "beta", "num_local", "alpha_init",
                     "init_std", "chunks_per_seq", "steps", "batch_size", "grad_accum", "lr", "lr_embed_norm",
                     "lr_lora", "rope_scaling", "max_grad_norm", "seed", "world_size")


def add_model_and_compressor_arguments(parser: argparse.ArgumentParser, *, dtype_help: str, compressor_group: str,
                                       alpha_init: float, init_std: float):
    """The model, data and LoCoCo flags of `lococo train` and `lococo distill`; returns the compressor group."""
    data = parser.add_argument_group("model and data")
    data.add_argument("--output", required=True, help="output folder (also resumes from it)")
    data.add_argument("--model", default=None,
                      help="a from_pretrained folder, or a fetched model: smollm2-135m (default) or "
                             "gemma3-270m")
    add_assets_dir(data)
    data.add_argument("--docs", nargs="+", metavar="FILE",
                      help="train on these plain-text files instead of the split's train documents")
    data.add_argument("--split-file", default=None, help="a splits.json (default: the packaged one)")
    data.add_argument("--max-docs", type=positive_int, default=None, help="use only the first N documents")
    data.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=dtype_help)
    data.add_argument("--skip-damaged", action="store_true",
                      help="leave out fetched documents that fail their checksum, with a warning (default: refuse)")

    lococo = parser.add_argument_group(compressor_group)
    lococo.add_argument("--num-slots", "-M", type=positive_int, default=128, help="M")
    lococo.add_argument("--chunk-size", "-B", type=positive_int, default=128, help="B")
    lococo.add_argument("--rho", type=fraction, default=0.5, help="fraction of fused slots, in [0, 1]")
    lococo.add_argument("--beta", type=non_negative_int, default=16)
    lococo.add_argument("--kernel-size", type=odd_int(), default=21)
    lococo.add_argument("--num-local", type=non_negative_int, default=0)
    lococo.add_argument("--alpha-init", type=finite_real, default=alpha_init)
    lococo.add_argument("--init-std", type=positive_real, default=init_std)
    return lococo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_compressor_arguments(parser, dtype_help="dtype of the frozen LLM",
                                       compressor_group="compressor (the LoCoCo hyper-parameters)",
                                       alpha_init=0.5, init_std=1.0)

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--chunks-per-seq", "-P", type=positive_int, default=32,
                     help="P: sequences are B * P tokens")
    opt.add_argument("--steps", type=positive_int, default=200, help="optimizer updates")
    opt.add_argument("--batch-size", type=positive_int, default=1,
                     help="sequences per forward and process (the original code used 1)")
    opt.add_argument("--grad-accum", type=positive_int, default=1,
                     help="forwards per update and process; an update takes batch_size * "
                          "grad_accum * processes sequences")
    opt.add_argument("--lr", type=positive_real, default=DEFAULT_LR["compressor"], help="conv and alpha")
    opt.add_argument("--train-embed-norm", action="store_true",
                     help="also train the embeddings and the norms")
    opt.add_argument("--lr-embed-norm", type=positive_real, default=DEFAULT_LR["embed_norm"])
    opt.add_argument("--lora", action="store_true", help="also train LoRA r=8 on q/k/v/o")
    opt.add_argument("--lora-rank", type=positive_int, default=8)
    opt.add_argument("--lr-lora", type=positive_real, default=DEFAULT_LR["lora"])
    opt.add_argument("--rope-scaling", type=positive_real, default=None, metavar="FACTOR",
                     help="linear RoPE scaling factor (context extension)")
    opt.add_argument("--max-grad-norm", type=positive_real, default=None,
                     help="clip the gradient norm (the original recipe does not)")
    opt.add_argument("--seed", type=int_at_least(0, 2**32 - 1), default=0)

    out = parser.add_argument_group("logging and checkpoints (one run per --output folder)")
    out.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N updates")
    run_folder.add_arguments(out)
    out.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def validate(args) -> None:
    """The checks that involve several arguments, before anything is loaded."""
    try:
        lococo_config(args)
    except ValueError as exc:  # the config names its fields; say them as the flags that set them
        message = str(exc).replace("LoCoCoConfig: ", "")
        raise UsageError(re.sub(r"\b(num_slots|rho|beta|kernel_size|num_local|alpha_init|init_std|chunk_size)\b",
                                lambda m: "--" + m.group(1).replace("_", "-"), message)) from None
    if (args.chunks_per_seq - 1) * args.chunk_size <= args.num_slots + args.beta:
        raise UsageError(f"sequences of {args.chunks_per_seq} chunks of {args.chunk_size} tokens never "
                         f"overflow M + beta = {args.num_slots + args.beta} before their last chunk; raise "
                         "--chunks-per-seq")
    for path in args.docs or []:
        if not Path(path).is_file():
            raise UsageError(f"--docs {path}: no such file")
    if args.split_file is not None and not Path(args.split_file).is_file():
        raise UsageError(f"--split-file {args.split_file}: no such file")


# ----------------------------------------------------------------------------------------
# Data: windows of B * P tokens cut from documents, in a seeded order
# ----------------------------------------------------------------------------------------

class TokenWindows:
    """Non-overlapping windows of seq_len tokens from every document, shuffled by seed.

    Window i of the order is the same on every run and process, so a run that resumes at a
    sequence count reads exactly the sequences it would have read. Documents are tokenized on
    first use (the split records their token counts, so nothing is tokenized up front).
    """

    def __init__(self, documents: list[tuple[str, int]], read, tokenizer, seq_len: int,
                 seed: int):
        self.read, self.tokenizer, self.seq_len = read, tokenizer, seq_len
        self.windows = [(doc, start) for doc, tokens in documents
                        for start in range(0, tokens - seq_len + 1, seq_len)]
        if not self.windows:
            raise ValueError(f"no document has {seq_len} tokens (chunk_size * chunks_per_seq)")
        random.Random(seed).shuffle(self.windows)
        self._doc, self._ids = None, None

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int):
        import torch

        from . import assets

        doc, start = self.windows[index % len(self.windows)]
        if doc != self._doc:
            text = self.read(doc)
            self._doc = doc
            self._ids = assets.encode(self.tokenizer, text)
        ids = self._ids[start:start + self.seq_len]
        if len(ids) < self.seq_len:
            raise ValueError(f"{doc} has fewer tokens than recorded; the split does not match "
                             "this tokenizer or document")
        return torch.tensor(ids, dtype=torch.long)


def training_documents(args, tokenizer) -> tuple[list[tuple[str, int]], object]:
    """(document, token count) pairs and a function that reads a document's text.

    Every document of the split is looked up before training starts: one missing from the
    fetched packages (or changed since the split was made) is left out with a warning, so that
    no run stops half way, or again at the same place when it resumes. One whose fetched file is
    damaged is refused, or left out too with --skip-damaged. Files of --docs must be text.
    """
    from . import assets

    if args.docs:
        texts = {path: assets.read_text_file(path) for path in args.docs}
        docs = [(path, len(assets.encode(tokenizer, text)))
                for path, text in texts.items()]
        return docs[:args.max_docs], texts.__getitem__
    split = assets.load_split(args.split_file)
    wanted = list(split.train[:args.max_docs])
    problems = assets.check_documents(wanted, args.assets_dir)
    assets.refuse_damaged(problems, args.assets_dir, skip=getattr(args, "skip_damaged", None))
    usable = [doc for doc in wanted if doc.id not in problems]
    if not usable:
        raise assets.AssetMissingError("The training text", assets.cache_dir(args.assets_dir), "train-text")
    if problems:
        listed = "; ".join(f"{doc_id} ({why})" for doc_id, why in list(problems.items())[:3])
        print(f"lococo train: warning: {len(problems)} of the {len(wanted)} training documents are left out, "
              f"they are not as the split recorded them in the fetched text: {listed}"
              + (" ..." if len(problems) > 3 else ""), file=sys.stderr, flush=True)

    def read(doc_id: str) -> str:
        return assets.read_document(doc_id, args.assets_dir)

    if getattr(args, "model", None) is None:   # the split counted the default model's tokens
        return [(doc.id, doc.tokens) for doc in usable], read
    return [(doc.id, len(assets.encode(tokenizer, read(doc.id)))) for doc in usable], read


# ----------------------------------------------------------------------------------------
# Model, compressor and parameter groups
# ----------------------------------------------------------------------------------------

def load_llm(args):
    """The frozen LLM and its tokenizer, with linear RoPE scaling when asked."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import assets

    path = assets.resolve_model(args.model, args.assets_dir)
    config = AutoConfig.from_pretrained(path)
    if args.rope_scaling:
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope.update({"rope_type": "linear", "factor": float(args.rope_scaling)})
        config.rope_parameters = rope
        config.max_position_embeddings = int(config.max_position_embeddings * args.rope_scaling)
    model = AutoModelForCausalLM.from_pretrained(path, config=config,
                                                 dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.requires_grad_(False)
    return model, tokenizer


def lococo_config(args):
    from ..config import LoCoCoConfig

    return LoCoCoConfig(num_slots=args.num_slots, rho=args.rho, beta=args.beta,
                        kernel_size=args.kernel_size, num_local=args.num_local,
                        alpha_init=args.alpha_init, init_std=args.init_std,
                        chunk_size=args.chunk_size)


def group_lr(args, name: str) -> float:
    """The learning rate the arguments give a parameter group."""
    return {"compressor": args.lr, "embed_norm": args.lr_embed_norm, "lora": args.lr_lora}[name]


def param_groups(model, compressor, args) -> list[dict]:
    """AdamW groups: the compressor, then optionally embeddings+norms and LoRA; no decay."""
    groups = [{"name": "compressor", "params": list(compressor.parameters()), "lr": args.lr,
               "weight_decay": 0.0}]
    if args.train_embed_norm:
        chosen = [p for name, p in model.named_parameters()
                  if "embed_tokens" in name or re.search(r"norm", name)]
        for p in chosen:
            p.requires_grad_(True)
        groups.append({"name": "embed_norm", "params": chosen, "lr": args.lr_embed_norm,
                       "weight_decay": 0.0})
    if args.lora:
        lora = [p for name, p in model.named_parameters() if "lora_" in name]
        for p in lora:
            p.requires_grad_(True)
        groups.append({"name": "lora", "params": lora, "lr": args.lr_lora, "weight_decay": 0.0})
    for group in groups:
        if not group["params"]:
            raise ValueError(f"parameter group {group['name']} is empty")
    return groups


def add_lora(model, rank: int):
    """LoRA adapters injected in place (the model keeps its class)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return inject_adapter_in_model(config, model)


def merge_lora(model) -> None:
    """Fold the LoRA adapters into the base weights and remove them (for save_pretrained)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())


def make_train_module(model, compressor):
    """One module holding the LLM and the compressor; its forward is the LLM's.

    Data parallelism wraps this module, so that the compressor's gradients are averaged across
    processes although the LLM reaches the compressor only through the cache. It takes the
    cache under either keyword ("cache" or "past_key_values": a wrapper's signature does not
    say which the LLM wants) and hands it on under the LLM's.
    """
    import torch

    from ..hf.compat import cache_kwarg

    name = cache_kwarg(model)

    class LoCoCoTrainModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.llm, self.compressor = model, compressor

        def forward(self, input_ids, past_key_values=None, cache=None, **kwargs):
            kwargs[name] = cache if cache is not None else past_key_values
            return self.llm(input_ids=input_ids, **kwargs)

    return LoCoCoTrainModule()


def sequence_losses(module, inner, ids, chunk_size: int, backward) -> list[float]:
    """Sequences [batch, B * P] chunk by chunk through a fresh LoCoCo cache.

    Each chunk's loss is back-propagated at once (``backward(loss, last_chunk)``); the cache
    is detached after every chunk (``lococo.iter_chunks``), so the graph of a chunk reaches
    the compression that built its slots but not the chunks before.
    """
    from ..hf.caches import build_cache
    from ..hf.chunked import iter_chunks

    cache = build_cache("lococo", inner.llm, inner.compressor)
    losses = []
    for chunk in iter_chunks(module, ids, cache, chunk_size):
        if chunk.loss.requires_grad:  # chunks before the first compression train nothing
            backward(chunk.loss, chunk.stop == ids.shape[1])
        losses.append(float(chunk.loss.detach()))
    return losses


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

def trainable_state(model, compressor) -> dict:
    state = {f"compressor.{k}": v.detach().clone() for k, v in compressor.state_dict().items()}
    state.update({f"model.{n}": p.detach().clone() for n, p in model.named_parameters()
                  if p.requires_grad})
    return state


def load_trainable_state(model, compressor, state: dict) -> None:
    import torch

    own = dict(model.named_parameters())
    comp = {k[len("compressor."):]: v for k, v in state.items() if k.startswith("compressor.")}
    compressor.load_state_dict(comp)
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith("model."):
                own[key[len("model."):]].copy_(value)


def rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict) -> None:
    import torch

    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


STATE_FILE, CHECKPOINT_ARGS_FILE = "state.pt", "run_args.json"


def save_checkpoint_files(folder: Path, state: dict) -> None:
    """A checkpoint: ``state.pt`` (weights, optimizer, scheduler, position, RNG: tensors and numbers) and the
    arguments that matter (``run_args.json``)."""
    import torch

    torch.save({k: v for k, v in state.items() if k != "args"}, folder / STATE_FILE)
    (folder / CHECKPOINT_ARGS_FILE).write_text(json.dumps(state["args"], indent=1) + "\n")


def load_checkpoint_files(folder: Path) -> run_folder.Checkpoint:
    """A checkpoint's state, every field checked (DamagedFile naming the file and the field)."""
    import torch

    path = folder / STATE_FILE
    state = run_folder.load_tensors(path)
    step = run_folder.get_count(path, state, "step")
    run_folder.get_count(path, state, "sequences")
    run_folder.get(path, state, "trainable", dict, lambda d: all(isinstance(v, torch.Tensor) for v in d.values()),
                   "a mapping of names to tensors")
    run_folder.get(path, state, "optimizer", dict, lambda d: {"state", "param_groups"} <= d.keys(),
                   "an optimizer state (state, param_groups)")
    run_folder.get(path, state, "scheduler", dict)
    rng = run_folder.get(path, state, "rng", dict, lambda d: {"python", "torch", "cuda"} <= d.keys(),
                         "the random states (python, torch, cuda)")
    run_folder.get(path, rng, "python", (list, tuple), lambda v: len(v) == 3, "python's random state")
    run_folder.get(path, rng, "torch", torch.Tensor, lambda t: t.dtype == torch.uint8, "a uint8 tensor")
    args_path = folder / CHECKPOINT_ARGS_FILE
    return run_folder.Checkpoint(step, run_folder.read_json(args_path) if args_path.exists() else None, state)


TRAIN = run_folder.Recipe(
    unit="update", log_key="step", total="steps", prefix="step", frozen=FROZEN, resumable=RESUMABLE_CHANGES,
    files=(STATE_FILE, CHECKPOINT_ARGS_FILE), save=save_checkpoint_files, load=load_checkpoint_files,
    outputs=lambda record: ("model",) if record.get("lora") or record.get("train_embed_norm") else ())


def save_with_alpha_panel(fig, ax, xs: list, rows: list[dict], xlabel: str, path: Path) -> None:
    """Draws every layer's alpha against ``xs`` on ``ax`` (dark = first layer), then saves ``fig``."""
    import matplotlib.pyplot as plt

    num_layers = len(rows[0]["alpha"])
    for layer in range(num_layers):
        ax.plot(xs, [r["alpha"][layer] for r in rows], lw=0.8, color=plt.cm.viridis(layer / max(1, num_layers - 1)))
    ax.set(xlabel=xlabel, ylabel="alpha", title="alpha per layer (dark = first layer)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv_and_plot(output: Path) -> None:
    rows = run_folder.read_log(output)
    if not rows:
        return
    num_layers = len(rows[0]["alpha"])
    with open(output / "log.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        lr_names = sorted(rows[0]["lr"])
        writer.writerow(["step", "sequences", "tokens", "loss", "grad_norm", "seconds"]
                        + [f"lr_{n}" for n in lr_names] + [f"alpha_{i}" for i in range(num_layers)])
        for r in rows:
            writer.writerow([r["step"], r["sequences"], r["tokens"], r["loss"], r["grad_norm"],
                             r["seconds"]] + [r["lr"][n] for n in lr_names] + r["alpha"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_alpha) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    ax_loss.plot(steps, [r["loss"] for r in rows], lw=1)
    ax_loss.set(xlabel="update", ylabel="loss (mean over chunks)", title="training loss")
    ax_loss.grid(alpha=0.3)
    save_with_alpha_panel(fig, ax_alpha, steps, rows, "update", output / "loss.png")


# ----------------------------------------------------------------------------------------
# Set-up, the loop and the report
# ----------------------------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite; nothing non-finite is saved."""


@dataclass
class Session:
    """Everything the loop needs, built by ``set_up``."""

    args: argparse.Namespace
    plan: run_folder.RunPlan
    accelerator: object
    model: object
    tokenizer: object
    compressor: object
    groups: list[dict]
    module: object
    inner: object
    optimizer: object
    scheduler: object
    windows: TokenWindows
    num_documents: int
    step: int = 0
    sequences: int = 0

    @property
    def output(self) -> Path:
        return self.plan.output


def schedule(step: int, steps: int) -> float:
    """Linear decay to 0 at ``steps``, no warm-up."""
    return max(0.0, 1.0 - step / steps)


def apply_learning_rates(optimizer, scheduler, base_lrs: list[float], step: int, steps: int) -> None:
    """Puts the learning rates of this run's arguments at update ``step`` into a restored optimizer.

    A restored optimizer carries the learning rates of the run that saved it; with the same
    arguments this writes the same values, with a new --lr or --steps (``--resume-with-changes``)
    the new ones, so that no update runs at a stale rate.
    """
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["initial_lr"] = base
        group["lr"] = base * schedule(step, steps)
    scheduler.base_lrs = list(base_lrs)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def make_accelerator():
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # Several backward calls per sequence, and the first chunks of a sequence do not reach the
    # compressor (nothing to compress yet): DDP must accept parameters without gradients.
    return Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def set_up(args, accelerator) -> Session:
    """Checks the run folder (its lock held by the main process), then builds the session and, when resuming,
    restores the checkpoint."""
    from accelerate.utils import set_seed

    if accelerator.is_main_process:
        run_folder.recover(Path(args.output), TRAIN)
    accelerator.wait_for_everyone()  # the leftovers of a crash are gone before any process reads the folder
    plan = run_folder.open_run(args, TRAIN, run_folder.run_arguments(args, TRAIN,
                                                                     world_size=accelerator.num_processes))
    set_seed(args.seed)
    session = build_session(args, plan, accelerator)
    if plan.state is not None:
        restore_checkpoint(session)
    accelerator.wait_for_everyone()  # every process has read the folder before the main one changes it
    if accelerator.is_main_process:
        run_folder.prepare_folder(plan, {
            **{k: v for k, v in vars(args).items() if k not in ("func", "validate")},
            "lococo_config": session.compressor.config.to_dict(), "world_size": accelerator.num_processes,
            "train_windows": len(session.windows), "train_documents": session.num_documents})
    accelerator.wait_for_everyone()
    return session


def build_session(args, plan: run_folder.RunPlan, accelerator) -> Session:
    """The LLM with its compressor and trainable groups, the training windows and the optimizer."""
    import torch

    from ..compressor import LoCoCoCompressor
    from ..hf.patching import apply_lococo

    model, tokenizer = load_llm(args)
    if args.lora:
        model = add_lora(model, args.lora_rank)
    compressor = LoCoCoCompressor.for_model(model, lococo_config(args))
    compressor.requires_grad_(True)
    apply_lococo(model, compressor)
    groups = param_groups(model, compressor, args)
    docs, read = training_documents(args, tokenizer)
    windows = TokenWindows(docs, read, tokenizer, args.chunk_size * args.chunks_per_seq, args.seed)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, args.steps))
    module, optimizer = accelerator.prepare(make_train_module(model, compressor), optimizer)
    return Session(args, plan, accelerator, model, tokenizer, compressor, groups, module,
                   accelerator.unwrap_model(module), optimizer, scheduler, windows, len(docs))


def restore_checkpoint(session: Session) -> None:
    """Weights, optimizer, scheduler, RNG and data position of the checkpoint ``open_run`` chose."""
    plan = session.plan
    load_trainable_state(session.model, session.compressor, plan.state["trainable"])
    session.optimizer.load_state_dict(plan.state["optimizer"])
    session.scheduler.load_state_dict(plan.state["scheduler"])
    restore_rng(plan.state["rng"])
    session.step, session.sequences = plan.count, plan.state["sequences"]
    base_lrs = [group_lr(session.args, group["name"]) for group in session.optimizer.param_groups]
    apply_learning_rates(session.optimizer, session.scheduler, base_lrs, session.step, session.args.steps)
    changed = f" with {', '.join(plan.changes)} changed" if plan.changes else ""
    session.accelerator.print(f"resuming from {plan.checkpoint} (update {session.step}){changed}")
    plan.state = None  # the weights are in the model now: do not hold a second copy


def train_update(session: Session) -> dict:
    """One optimizer update over batch_size * grad_accum sequences per process; its log row."""
    import torch

    args, accelerator, module = session.args, session.accelerator, session.module
    world, rank = accelerator.num_processes, accelerator.process_index
    started = time.perf_counter()
    session.optimizer.zero_grad(set_to_none=True)
    losses: list[float] = []
    for micro in range(args.grad_accum):
        first = session.sequences + (micro * world + rank) * args.batch_size
        ids = torch.stack([session.windows[first + i] for i in range(args.batch_size)])
        ids = ids.to(accelerator.device)
        last_micro = micro == args.grad_accum - 1

        def backward(loss, last_chunk, last_micro=last_micro):
            # Gradients are averaged across processes once per update, on the last chunk.
            scaled = loss / (args.grad_accum * args.chunks_per_seq)
            if last_chunk and last_micro:
                accelerator.backward(scaled)
            else:
                with accelerator.no_sync(module):
                    accelerator.backward(scaled)

        losses += sequence_losses(module, session.inner, ids, args.chunk_size, backward)
    grad_norm = None
    if args.max_grad_norm:
        grad_norm = float(accelerator.clip_grad_norm_(
            [p for g in session.groups for p in g["params"]], args.max_grad_norm))
    used_lr = {g["name"]: g["lr"] for g in session.optimizer.param_groups}
    session.optimizer.step()
    session.scheduler.step()
    session.step += 1
    session.sequences += args.batch_size * args.grad_accum * world
    loss = float(accelerator.reduce(torch.tensor(sum(losses) / len(losses), device=accelerator.device), "mean"))
    trainable = [p for g in session.groups for p in g["params"]]
    if not math.isfinite(loss) or not all(bool(torch.isfinite(p).all()) for p in trainable):
        saved = run_folder.checkpoints(session.output, TRAIN)
        raise TrainingDiverged(
            f"update {session.step} made the loss or the weights non-finite (loss {loss}); nothing was saved "
            f"for it{f', the last checkpoint is {saved[0][1]}' if saved else ''}. Lower --lr or set --max-grad-norm")
    return {"step": session.step, "sequences": session.sequences,
            "tokens": session.sequences * args.chunk_size * args.chunks_per_seq,
            "loss": round(loss, 5), "grad_norm": grad_norm, "lr": used_lr,
            "alpha": [round(float(layer.alpha.detach()), 5) for layer in session.compressor.layers],
            "seconds": round(time.perf_counter() - started, 3)}


def run_updates(session: Session) -> None:
    """Updates until --steps, logging every one and checkpointing every --save-every."""
    from tqdm.auto import tqdm

    args, accelerator = session.args, session.accelerator
    bar = tqdm(total=args.steps, initial=min(session.step, args.steps), unit="update", desc="lococo train",
               disable=args.no_progress or not accelerator.is_local_main_process)
    session.module.train()
    while session.step < args.steps:
        row = train_update(session)
        if accelerator.is_main_process:
            with open(session.output / run_folder.LOG_FILE, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        bar.update(1)
        if session.step % args.save_every == 0 or session.step == args.steps:
            if accelerator.is_main_process:
                state = {"step": session.step, "sequences": session.sequences,
                         "trainable": trainable_state(session.model, session.compressor),
                         "optimizer": session.optimizer.state_dict(), "scheduler": session.scheduler.state_dict(),
                         "rng": rng_state(), "args": session.plan.run_args}
                run_folder.save_checkpoint(session.output, TRAIN, session.step, state, args.keep_checkpoints)
                write_csv_and_plot(session.output)
            accelerator.wait_for_everyone()
    bar.close()


def write_outputs(session: Session) -> None:
    """The compressor, the merged LLM when its weights were trained, the CSV log and the plot."""
    from ..hf.patching import remove_lococo

    args, accelerator = session.args, session.accelerator
    if accelerator.is_main_process:
        session.compressor.save_pretrained(session.output)
        if args.lora or args.train_embed_norm:
            remove_lococo(session.model)
            if args.lora:
                merge_lora(session.model)
            session.model.save_pretrained(session.output / "model")
            session.tokenizer.save_pretrained(session.output / "model")
        write_csv_and_plot(session.output)
        accelerator.print(f"compressor saved to {session.output}")
    accelerator.wait_for_everyone()


def main(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    accelerator = make_accelerator()
    # the main process holds the folder's lock from before it reads the folder until it exits
    with run_folder.lock(Path(args.output)) if accelerator.is_main_process else contextlib.nullcontext():
        session = set_up(args, accelerator)
        try:
            run_updates(session)
        except TrainingDiverged as exc:
            print(f"lococo train: error: {exc}", file=sys.stderr)
            accelerator.end_training()
            return 1
        write_outputs(session)
        accelerator.end_training()
        return 0
