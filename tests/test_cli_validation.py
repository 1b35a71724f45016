"""Every number of the command line is checked before any model loads: exit code 2, the flag, the range."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from lococo.recipes import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Any model or tokenizer load fails the test (a config may be read): validation must end the command first."""
    import transformers

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", loaded)


def usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


EVAL = ["eval", "--docs", __file__, "--output"]


@pytest.mark.parametrize("argv, flag, expected", [
    (["-M", "0"], "--num-slots/-M", "must be an integer >= 1, got 0"),
    (["--chunk-size", "0"], "--chunk-size/-B", "must be an integer >= 1, got 0"),
    (["--start-token", "-10"], "--start-token", "must be an integer >= 0, got -10"),
    (["--max-docs", "-1"], "--max-docs", "must be an integer >= 1, got -1"),
    (["--max-tokens", "1"], "--max-tokens", "must be an integer >= 2, got 1"),
    (["--buckets", "abc"], "--buckets", "must be comma-separated integers such as 0,1024,2048, got 'abc'"),
    (["--buckets", "0,0,0"], "--buckets", "must be at least two strictly increasing integers >= 0, got '0,0,0'"),
    (["--beta", "-1"], "--beta", "must be an integer >= 0, got -1"),
    (["-M", "-3"], "--num-slots/-M", "must be an integer >= 1, got -3"),
    (["--num-local", "-1"], "--num-local", "must be an integer >= 0, got -1"),
    (["--methods", "full,bogus"], "--methods", "unknown methods ['bogus']"),
])
def test_eval_numbers_are_checked_by_argparse(capsys, tmp_path, argv, flag, expected):
    err = usage_error(capsys, EVAL + [str(tmp_path)] + argv)
    assert f"argument {flag}: {expected}" in err


@pytest.mark.parametrize("argv, expected", [
    (["-M", "1", "--methods", "full,streaming"], "--num-slots 1 does not suit the streaming method"),
    (["-M", "8", "--num-local", "9", "--methods", "h2o"],
     "--num-slots 8 and --num-local 9 do not suit the h2o method: num_local must be in [0, num_slots = 8]"),
    (["-M", "8", "--num-local", "9", "--methods", "tova"], "--num-slots 8 and --num-local 9 do not suit the tova"),
    (["--buckets", "9000,10000", "--max-tokens", "8192"], "--buckets start at 9000"),
    (["--methods", "full,lococo"], "the lococo method needs --compressor"),
    (["--device", "gpu0"], "--device gpu0: not a device (cpu, cuda, cuda:N)"),
    (["--device", "cuda:64"], "--device cuda:64: torch sees"),
])
def test_eval_argument_combinations_are_checked_before_the_model(capsys, tmp_path, argv, expected):
    assert expected in usage_error(capsys, EVAL + [str(tmp_path)] + argv)


def test_eval_unwritable_output_fails_first(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = usage_error(capsys, EVAL + [str(blocker / "results"), "--methods", "full"])
    assert f"--output {blocker / 'results'} cannot be written" in err


def test_eval_compressor_for_another_model_fails_before_the_model(capsys, tmp_path):
    from transformers import LlamaConfig

    import lococo

    small = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    small.save_pretrained(tmp_path / "model")
    small.num_hidden_layers = 3
    lococo.LoCoCoCompressor.for_model(small, num_slots=16).save_pretrained(tmp_path / "compressor")
    err = usage_error(capsys, EVAL + [str(tmp_path / "out"), "--model", str(tmp_path / "model"), "--compressor",
                                      str(tmp_path / "compressor")])
    assert "--compressor was built for llama with 3 layers and head_dim 8; the model (llama) differs: 3 decoder " \
           "layers vs 2" in err


def test_eval_compressor_is_read_before_the_model(capsys, tmp_path):
    err = usage_error(capsys, EVAL + [str(tmp_path), "--compressor", str(tmp_path / "none")])
    assert "--compressor:" in err and "lococo_config.json" in err and "smollm2-135m-m128" in err   # the shipped names


def test_eval_takes_a_shipped_compressor_by_name(capsys, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "model")
    err = usage_error(capsys, EVAL + [str(tmp_path / "out"), "--model", str(tmp_path / "model"), "--compressor",
                                      "smollm2-135m-m256"])
    assert "--compressor was built for llama with 30 layers" in err   # found by name, then checked against the model


@pytest.mark.parametrize("argv, flag, expected", [
    (["--steps", "0"], "--steps", "must be an integer >= 1, got 0"),
    (["--steps", "-2"], "--steps", "must be an integer >= 1, got -2"),
    (["--save-every", "0"], "--save-every", "must be an integer >= 1, got 0"),
    (["--grad-accum", "0"], "--grad-accum", "must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size", "must be an integer >= 1, got 0"),
    (["--lr", "nan"], "--lr", "must be a finite number > 0.0, got nan"),
    (["--lr", "-1"], "--lr", "must be a finite number > 0.0, got -1"),
    (["--rho", "1.5"], "--rho", "must be a finite number in [0.0, 1.0], got 1.5"),
    (["--kernel-size", "4"], "--kernel-size", "must be an odd integer >= 1, got 4"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints", "must be an integer >= 0, got -1"),
    (["--max-grad-norm", "inf"], "--max-grad-norm", "must be a finite number > 0.0, got inf"),
    (["--seed", "-1"], "--seed", "must be an integer in [0, 4294967295], got -1"),
])
def test_train_numbers_are_checked_by_argparse(capsys, tmp_path, argv, flag, expected):
    err = usage_error(capsys, ["train", "--output", str(tmp_path / "run"), *argv])
    assert f"argument {flag}: {expected}" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, expected", [
    (["-M", "4", "--rho", "0"], "--rho = 0.0 leaves no fused slot for --num-slots = 4"),
    (["-M", "16", "--num-local", "20"], "--num-local must be in [0, H = 8]"),
    (["-M", "128", "-B", "8", "-P", "4"], "raise --chunks-per-seq"),
    (["--docs", "/no/such/file.txt"], "--docs /no/such/file.txt: no such file"),
])
def test_train_argument_combinations_are_checked_before_the_model(capsys, tmp_path, argv, expected):
    assert expected in usage_error(capsys, ["train", "--output", str(tmp_path / "run"), *argv])


@pytest.mark.parametrize("argv, flag, expected", [
    (["--tokens", "-5"], "--tokens", "must be an integer >= 2, got -5"),
    (["--generate", "-1"], "--generate", "must be an integer >= 0, got -1"),
])
def test_demo_numbers_are_checked_by_argparse(capsys, argv, flag, expected):
    assert f"argument {flag}: {expected}" in usage_error(capsys, ["demo", *argv])


def test_demo_document_is_checked_before_the_model(capsys):
    err = usage_error(capsys, ["demo", "--doc", "nowhere.txt"])
    assert "--doc nowhere.txt: neither a file nor a document id" in err


def test_demo_without_a_compressor_fails_before_the_model(capsys, tmp_path):
    assert "no compressor at --compressor" in usage_error(capsys, ["demo", "--compressor", str(tmp_path)])


def test_assets_only_is_checked(capsys):
    err = usage_error(capsys, ["assets", "fetch", "--only", "bogus"])
    assert "argument --only: unknown assets ['bogus']: choose from model," in err
    err = usage_error(capsys, ["assets", "split", "--min-tokens", "0"])
    assert "argument --min-tokens: must be an integer >= 1, got 0" in err


def test_the_old_cache_flag_still_names_the_assets_folder():
    args = cli.build_parser().parse_args(["eval", "--cache", "/somewhere"])
    assert args.assets_dir == "/somewhere"
    assert "--cache" not in cli.build_parser()._subparsers._group_actions[0].choices["eval"].format_help()


def test_python_m_lococo_exits_2_without_a_traceback(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    for argv, expected in ((["train", "--output", str(tmp_path), "--steps", "0"], "argument --steps"),
                           (["train", "--output", str(tmp_path), "-M", "4", "--rho", "0"], "leaves no fused slot")):
        done = subprocess.run([sys.executable, "-m", "lococo", *argv], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "Traceback" not in done.stderr


def test_train_unwritable_output_fails_before_the_model(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = usage_error(capsys, ["train", "--output", str(blocker / "run"), "--docs", __file__])
    assert f"--output {blocker / 'run'} cannot be written" in err
