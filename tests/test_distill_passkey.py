"""`lococo distill` (layer-local training) and `lococo eval --task passkey` on a tiny saved model."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

import lococo
from lococo.recipes import cli, distill, passkey

from hf_models import save_model_and_document, tiny_compressor, tiny_model, transformers


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return root, save_model_and_document(root, seed=80, words=120)


def _distill(root, doc, sequences: int, *extra: str) -> int:
    return cli.main(["distill", "--output", str(root / "run"), "--model", str(root / "model"), "--docs", doc,
                     "-M", "8", "-B", "4", "--beta", "2", "--kernel-size", "3", "--seq-len", "48",
                     "--sequences", str(sequences), "--save-every", "1", "--compare-every", "1", "--no-progress",
                     *extra])


def test_distill_trains_saves_and_resumes(saved):
    root, doc = saved
    assert _distill(root, doc, 2) == 0
    compressor = lococo.LoCoCoCompressor.from_pretrained(root / "run")
    assert compressor.config.slot_bias and compressor.config.alpha_init == 0.0
    assert any(float(layer.slot_logit.detach().abs().max()) > 0 for layer in compressor.layers)
    rows = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["sequences"] for r in rows] == [1, 2]
    assert all(r["error"] > 0 and r["h2o_error"] > 0 and 0 <= min(r["alpha"]) <= max(r["alpha"]) <= 1 for r in rows)
    assert (root / "run" / "loss.png").is_file() and (root / "run" / "log.csv").is_file()

    assert _distill(root, doc, 2) == 0                 # the same arguments: nothing left to do
    assert json.loads((root / "run" / "train_args.json").read_text())["resumed_with_changes"] == []
    with open(root / "run" / "log.jsonl", "a") as log:  # a row written after the last checkpoint
        log.write(json.dumps({"sequences": 3}) + "\n")
    with pytest.raises(SystemExit) as exit_info:        # a longer run changes the schedule: asked for
        _distill(root, doc, 3)
    assert exit_info.value.code == 2
    assert _distill(root, doc, 3, "--resume-with-changes") == 0    # resumes at sequence 2
    rows = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["sequences"] for r in rows] == [1, 2, 3] and "error" in rows[-1]
    record = json.loads((root / "run" / "train_args.json").read_text())
    assert record["resumed_with_changes"] == [{"at_sequence": 2, "changes": {"sequences": [2, 3]}}]
    progress = root / "run" / "checkpoints" / "sequence-3" / "progress.json"
    assert json.loads(progress.read_text())["args"]["sequences"] == 3


def test_distill_keeps_one_run_per_folder(saved, capsys):
    root, doc = saved
    out = root / "folder"

    def run(*extra):
        return cli.main(["distill", "--output", str(out), "--model", str(root / "model"), "--docs", doc,
                         "-M", "8", "-B", "4", "--beta", "2", "--kernel-size", "3", "--seq-len", "48",
                         "--sequences", "1", "--compare-every", "0", "--no-progress", *extra])

    tiny_compressor(tiny_model()).save_pretrained(out)     # a compressor that no run wrote
    with pytest.raises(SystemExit):
        run()
    assert "--overwrite" in capsys.readouterr().err
    assert run("--overwrite") == 0
    for extra, named in ((("--kernel-size", "5"), "--kernel-size 3 -> 5"),       # the geometry: never
                         (("--no-resume",), "--overwrite"),
                         (("--resume-with-changes", "-M", "6"), "--num-slots 8 -> 6")):
        with pytest.raises(SystemExit) as exit_info:
            run(*extra)
        assert exit_info.value.code == 2 and named in capsys.readouterr().err
    assert run("--no-resume", "--overwrite", "--seed", "3") == 0
    assert json.loads((out / "train_args.json").read_text())["seed"] == 3
    shutil.rmtree(out / "checkpoints")                   # a run that stopped before its first checkpoint
    with pytest.raises(SystemExit):
        run("--seed", "4")
    assert "holds another run that has no checkpoint (--seed 3 -> 4)" in capsys.readouterr().err
    assert run("--seed", "3") == 0                       # the same run: started again
    assert [json.loads(line)["sequences"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]


def test_distill_refuses_bad_numbers_before_loading(saved, capsys):
    root, doc = saved
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", "--output", str(root / "bad"), "--seq-len", "0"])
    assert exit_info.value.code == 2 and "--seq-len" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _distill(root, doc, 1, "--seq-len", "12")      # never exceeds M + beta + B
    assert exit_info.value.code == 2


def _records(model, ids):
    distill.register_capture()
    model.set_attn_implementation(distill.CAPTURE)
    return distill.teacher_records(model, ids)


def test_replay_at_alpha_0_is_h2o_and_its_gradient_reaches_alpha_and_the_slot_logits():
    model = tiny_model("llama", "sdpa", seed=82)
    ids = torch.randint(3, 90, (2, 60), generator=torch.Generator().manual_seed(83))
    records = _records(model, ids)
    compressor = tiny_compressor(model, seed=84, slot_bias=True, chunk_size=5, alpha_init=0.4)
    attn = model.model.layers[1].self_attn
    layer = compressor.layers[1]
    forced, chunks = distill.replay_layer(layer, compressor.config, records[1], attn, alpha=0.0)
    with torch.no_grad():
        layer.alpha.zero_()
        layer.slot_logit.zero_()
    plain, same_chunks = distill.replay_layer(layer, compressor.config, records[1], attn)
    assert chunks == same_chunks > 5 and forced == pytest.approx(plain, rel=1e-5)
    # the full-cache replay of a sequence too short to compress has nothing to learn from
    short = {k: tuple(t[:, :, :10] if t.dim() == 4 and t.shape[2] == 60 else t[:, :10] for t in v)
             for k, v in records.items()}
    assert distill.replay_layer(layer, compressor.config, short[1], attn) == (0.0, 0)

    with torch.no_grad():
        layer.alpha.fill_(0.4)
    updates = []
    distill.replay_layer(layer, compressor.config, records[1], attn, step_every=2,
                         on_update=lambda: updates.append((layer.alpha.grad.clone(), layer.slot_logit.grad.clone())))
    assert updates and all(torch.isfinite(a) and a != 0 and s.abs().sum() > 0 for a, s in updates)


def test_lookahead_replay_ranks_by_the_coming_chunks_attention(monkeypatch):
    from lococo.hf.attention import attention_scores
    from lococo.hf.caches import LoCoCoLayer

    model = tiny_model("llama", "sdpa", seed=85)
    records = _records(model, torch.randint(3, 90, (1, 48), generator=torch.Generator().manual_seed(86)))
    compressor = tiny_compressor(model, seed=87, chunk_size=5)
    attn, (query, key, _, _) = model.model.layers[0].self_attn, records[0]
    seen = []
    compress = LoCoCoLayer.compress
    monkeypatch.setattr(LoCoCoLayer, "compress", lambda self: (seen.append(
        (self.cumulative_length, self.keys.clone(), self.scores.clone())), compress(self))[1])
    for lookahead in (True, False):
        seen.clear()
        distill.replay_layer(compressor.layers[0], compressor.config, records[0], attn, alpha=0.0, lookahead=lookahead)
        assert len(seen) > 3
        for start, stored_keys, scores in seen:
            stop = min(48, start + 5)   # the chunk about to be appended
            coming = attention_scores(query[:, :, start:stop].float(),
                                      torch.cat([stored_keys, key[:, :, start:stop].float()], -2), None,
                                      attn.scaling)[..., :stored_keys.shape[-2]]
            assert torch.allclose(scores, coming, atol=1e-5) == lookahead


def test_passkey_prompt_has_the_length_and_the_key_at_its_depth():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(
        ["[UNK]", *sorted(set((passkey.INTRO + passkey.FILLER + passkey.NEEDLE + passkey.QUESTION).split()))])},
        unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    for length in (200, 333):
        for depth in (0.0, 0.5, 1.0):
            ids = passkey.prompt_ids(tokenizer, length, depth, 12345)
            assert len(ids) == length
            text = tokenizer.decode(ids)
            where = text.index("pass key is")
            before = text[:where].count("grass")
            total = text.count("grass")
            assert abs(before / total - depth) < 0.15
    assert passkey.first_number(" 12345. Remember") == 12345 and passkey.first_number("none") is None


def test_eval_passkey_writes_one_row_per_method_length_and_depth(saved, tmp_path):
    root, _ = saved
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model")
    tiny_compressor(model, seed=85, num_slots=16, beta=4, chunk_size=32, kernel_size=3).save_pretrained(
        root / "compressor")
    assert cli.main(["eval", "--task", "passkey", "--model", str(root / "model"), "--compressor",
                     str(root / "compressor"), "--lengths", "400,480", "--depths", "0,1", "--trials", "1",
                     "--output", str(tmp_path), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "passkey.csv")))
    assert {(r["method"], r["length"], r["depth"]) for r in rows} == {
        (m, n, d) for m in ("full", "lococo", "h2o", "tova", "streaming")
        for n in ("400", "480") for d in ("0.0", "1.0")}
    assert all(int(r["successes"]) in (0, 1) for r in rows)
    assert (tmp_path / "passkey.png").is_file() and "| LoCoCo |" in (tmp_path / "passkey.md").read_text()


def test_the_default_lengths_fit_a_model_of_8k_positions():
    # SmolLM2-135M has 8192 positions: a prompt of 8192 tokens plus the answer would be refused
    from lococo.recipes import passkey

    assert max(passkey.DEFAULT_LENGTHS) + passkey.ANSWER_TOKENS <= 8192
    assert min(passkey.DEFAULT_LENGTHS) == 1024
