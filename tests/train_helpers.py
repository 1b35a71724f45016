"""`lococo train` calls and their log, shared by the command-line tests (fixtures: train_fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lococo.recipes import cli

TINY = ["-M", "16", "-B", "8", "--beta", "4", "--kernel-size", "5"]


def train(tiny_model, docs, output, *extra) -> int:
    return cli.main(["train", "--model", str(tiny_model), "--docs", *docs, "--output",
                     str(output), *TINY, "-P", "8", "--steps", "4", "--save-every", "2",
                     "--no-progress", *extra])


def refused(capsys, tiny_model, docs, output, *extra) -> str:
    """Runs `lococo train`, expects the usage exit (code 2) and returns its message."""
    with pytest.raises(SystemExit) as exit_info:
        train(tiny_model, docs, output, *extra)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def read_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
