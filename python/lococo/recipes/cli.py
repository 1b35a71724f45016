"""The `lococo` command line: assets, train and eval.

    lococo assets fetch [--only model,text,train-text,eval-text,<source>] [--force]
    lococo assets status [--full]
    lococo assets split [--output FILE] [--min-tokens N]
    lococo train --output DIR [...]          (see `lococo train --help`)
    lococo calibrate --output DIR [...]      per-layer budgets (see `lococo calibrate --help`)
    lococo eval --compressor DIR [...]       (see `lococo eval --help`)
    lococo passkey --compressor DIR [...]    the passkey task, as `eval --task passkey` (see `lococo passkey --help`)
    lococo demo [--tokens N]                 the full cache against LoCoCo on a real model
    lococo --version                         lococo's version, with torch's and transformers'

Heavy modules (torch, transformers) are imported only by the command that needs them. Every
argument is checked before any of them loads: a bad one ends the command with a message naming
it and exit code 2. A command whose packages are not installed names the extra that brings them
(`pip install 'lococo[train]'`), with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .argtypes import UsageError, UsageExit, add_assets_dir, choices_list, positive_int


def _assets_fetch(args) -> int:
    from . import assets

    only = [item for part in (args.only or []) for item in part]
    summary = assets.fetch(args.assets_dir, only or None, force=args.force)
    print(json.dumps(summary, indent=1))
    return 0


def _assets_status(args) -> int:
    from . import assets

    report = assets.status(args.assets_dir, full=args.full)
    print(json.dumps(report, indent=1))
    return 0 if all(v.get("ok") or v.get("optional") for v in report.values() if isinstance(v, dict)) else 1


def _assets_split(args) -> int:
    from . import assets

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir(args.assets_dir))
    split = assets.build_split(tokenizer, args.assets_dir, min_tokens=args.min_tokens)
    assets.write_split(split, args.output)
    print(f"{args.output}: " + ", ".join(f"{p} {len(split[p])} documents "
                                         f"({sum(d['tokens'] for d in split[p]) / 1e6:.1f}M tokens)"
                                         for p in ("train", "dev", "test")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lococo", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action=_Version, help="lococo's version, with torch's and transformers'")
    commands = parser.add_subparsers(dest="command", required=True)

    assets_parser = commands.add_parser("assets", help="the real model and text (offline cache)")
    assets_commands = assets_parser.add_subparsers(dest="assets_command", required=True)
    fetch = assets_commands.add_parser(
        "fetch", help="download, verify and convert the model and the documents (idempotent)")
    add_assets_dir(fetch)
    fetch.add_argument("--only", action="append", metavar="WHAT", type=choices_list(_asset_names, "assets"),
                       help="model, text, train-text, eval-text, a source name, or another model "
                            "(gemma3-270m); comma separated or repeated (default: model and text)")
    fetch.add_argument("--force", action="store_true", help="fetch again even when present")
    fetch.set_defaults(func=_assets_fetch)
    status = assets_commands.add_parser("status", help="what is cached and whether it verifies")
    add_assets_dir(status)
    status.add_argument("--full", action="store_true", help="check SHA-256 of every file")
    status.set_defaults(func=_assets_status)
    split = assets_commands.add_parser(
        "split", help="rebuild the train/dev/test document split from the cache (maintainers)")
    add_assets_dir(split)
    from .assets import SPLITS_FILE
    split.add_argument("--output", default=str(SPLITS_FILE), help="where to write the split")
    split.add_argument("--min-tokens", type=positive_int, default=4096, help="shortest document kept")
    split.set_defaults(func=_assets_split)

    from . import calibrate, demo, distill, evaluate, train
    train_parser = commands.add_parser("train", help="train the compressors on a frozen LLM",
                                       description=train.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(train_parser)
    train_parser.set_defaults(func=train.main, validate=train.validate)
    distill_parser = commands.add_parser("distill", help="train the compressors layer by layer against the full "
                                         "cache's attention output (cheaper than `train`)",
                                         description=distill.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    distill.add_arguments(distill_parser)
    distill_parser.set_defaults(func=distill.main, validate=distill.validate)
    calibrate_parser = commands.add_parser("calibrate", help="per-layer slot budgets from the model's own error "
                                           "curves (no training)", description=calibrate.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)
    calibrate.add_arguments(calibrate_parser)
    calibrate_parser.set_defaults(func=calibrate.main, validate=calibrate.validate)
    eval_parser = commands.add_parser("eval", help="perplexity by position: full cache, LoCoCo, "
                                      "H2O, StreamingLLM", description=evaluate.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_arguments(eval_parser)
    eval_parser.epilog = ("--task passkey has options of its own (--lengths, --depths, --trials, --seed): see\n"
                          "`lococo passkey --help`, also shown by `lococo eval --task passkey --help`.")
    eval_parser.set_defaults(func=evaluate.main, validate=evaluate.validate)
    add_passkey_command(commands)
    demo_parser = commands.add_parser("demo", help="SmolLM2 on a long document: full cache vs "
                                      "LoCoCo, then generation", description=demo.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=demo.main, validate=demo.validate)
    return parser


# The options of `lococo eval` that only the perplexity task reads: hidden from `lococo passkey --help`.
PPL_ONLY_OPTIONS = ("docs", "split", "split_file", "max_docs", "start_token", "max_tokens", "buckets", "bootstrap",
                    "task")


def add_passkey_command(commands) -> argparse.ArgumentParser:
    """`lococo passkey`: `lococo eval --task passkey`, with a help of its own (the task's options only)."""
    from . import evaluate, passkey

    passkey_parser = commands.add_parser(
        "passkey", help="passkey retrieval: a number hidden in long filler text, asked for at the end",
        description=passkey.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Same as `lococo eval --task passkey [...]`; the options of the method and the model are eval's.")
    evaluate.add_arguments(passkey_parser)
    for action in passkey_parser._actions:
        if action.dest in PPL_ONLY_OPTIONS:
            action.help = argparse.SUPPRESS
    passkey_parser.set_defaults(func=evaluate.main, validate=_passkey_validate, task="passkey",
                                output="lococo-passkey")
    return passkey_parser


def _passkey_validate(args) -> None:
    from . import evaluate

    args.task = "passkey"
    evaluate.validate(args)


def _task_help(argv: list[str]) -> list[str]:
    """`lococo eval --task passkey --help` shows the passkey task's help (`lococo passkey --help`)."""
    if not argv or argv[0] != "eval" or not {"-h", "--help"} & set(argv):
        return argv
    task = [b for a, b in zip(argv, argv[1:]) if a == "--task"] + [a.split("=", 1)[1] for a in argv
                                                                    if a.startswith("--task=")]
    return ["passkey", "--help"] if task[-1:] == ["passkey"] else argv


class _Version(argparse.Action):
    """--version: prints version_text() unwrapped (argparse's own action wraps it) and exits."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def version_text() -> str:
    """`lococo --version`: lococo's version, and the torch and transformers it runs with."""
    import platform

    import torch

    from .. import __version__
    from ..extras import installed_version

    transformers = installed_version("transformers") or "not installed: pip install 'lococo[hf]'"
    return (f"lococo {__version__} (torch {torch.__version__}, transformers {transformers}, "
            f"Python {platform.python_version()})")


def _asset_names() -> list[str]:
    from .assets import GROUPS, MODELS, SOURCES

    return [*GROUPS, *(m for m in MODELS if m not in GROUPS), *SOURCES]


def main(argv: list[str] | None = None) -> int:
    # transformers 5.25 swaps layers for kernels fetched from the Hub at from_pretrained (and needs the
    # `kernels` package for it); the recipes run offline on the fetched model, as with earlier releases.
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    parser = build_parser()
    args = parser.parse_args(_task_help(sys.argv[1:] if argv is None else list(argv)))
    from ..extras import missing_extra
    from .assets import AssetError

    command = f"{parser.prog} {args.command}"
    try:
        if getattr(args, "validate", None) is not None:
            args.validate(args)
        return int(args.func(args) or 0)
    except UsageError as exc:
        message = f"{command}: error: {exc}"
        print(message, file=sys.stderr)
        raise UsageExit(message) from None
    except AssetError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:   # a package of the `train` extra (every recipe's) is not installed
        error = missing_extra(exc, command, "train")
        if error is None:
            raise
        print(f"{command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
