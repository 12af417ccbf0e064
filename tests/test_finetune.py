"""``lily-deploy finetune``: learning, saving, resuming, DDP, LoRA matching and bad input, on tiny models."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lily_deploy import training
from lily_deploy.cli import cli
from lily_deploy.core.config import ConfigError
from lily_deploy.core.errors import LilyDeployError
from lily_deploy.training import (FinetuneConfig, abbreviate, finetune, lily_param_count, lora_rank_for,
                                  resolve_targets, route_lily_layers, split_for_rank, target_of)

ROOT = Path(__file__).resolve().parents[1]
POS = ["good", "great", "excellent", "superb", "lovely", "wonderful"]
NEG = ["bad", "awful", "poor", "terrible", "dreadful", "boring"]
FILL = ["the", "movie", "film", "plot", "acting", "was", "really", "quite", "very", "story", "and", "music"]
QUIET = {"progress": False, "log": lambda msg: None}


def _toy_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Sentences whose label is carried by one sentiment word among filler (learnable by a tiny model)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILL, rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), rng.choice(POS if label else NEG))
        rows.append((" ".join(words), "pos" if label else "neg"))
    return rows


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT without dropout (so DDP and one process can agree exactly)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lily_deploy.core.models import minilm_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=130, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    out = tmp_path_factory.mktemp("tinybert") / "base"
    BertForSequenceClassification(cfg).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("toy")
    return {"train": write_tsv(d / "train.tsv", _toy_rows(96, 0)), "val": write_tsv(d / "val.tsv", _toy_rows(32, 1))}


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, toy, tmp_path_factory) -> dict:
    """One CLI run that learns the toy task (shared by the loading checks)."""
    out = tmp_path_factory.mktemp("run") / "adapter"
    result = CliRunner().invoke(cli, [
        "finetune", "--model", str(tiny_bert_dir), "--train", str(toy["train"]), "--val", str(toy["val"]),
        "-o", str(out), "--max-steps", "100", "--batch-size", "16", "--rank", "8", "--lr", "0.05",
        "--eval-every", "25", "--warmup", "0.1", "--no-progress"])
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output}


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r and "event" not in r]


def _evals(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("event") == "eval"]


def _ckpt_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / "last" / "trainable.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------ learning and the output folder
def test_training_lowers_loss_and_keeps_best(trained):
    out = trained["out"]
    losses = _losses(out)
    assert len(losses) == 100
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    evals = _evals(out)
    assert [e["step"] for e in evals] == [25, 50, 75, 100]
    best = max(evals, key=lambda e: (e["val_accuracy"], -e["step"]))
    assert best["val_accuracy"] >= 0.75
    sidecar = json.loads((out / "lily_deploy.json").read_text())
    assert sidecar["best"]["step"] == best["step"]
    assert sidecar["best"]["val_accuracy"] == best["val_accuracy"]
    assert sidecar["labels"] == ["neg", "pos"] and sidecar["task"] == "seq-cls"
    assert sidecar["routing"] == "sample" and sidecar["method"] == "lily"  # the default: as export deploys
    assert Path(sidecar["base_model"]).is_absolute()
    assert "trainable parameters: Lily adapter" in trained["output"]
    assert "LoRA adapter" in trained["output"]


def test_saved_adapter_loads_in_peft_deploy_and_inspect(trained, tiny_bert_dir, toy):
    from peft import PeftModel

    from lily_deploy.core.data import encode_batch
    from lily_deploy.core.deploy import load_model
    from lily_deploy.core.models import load_base

    out = trained["out"]
    base = load_base(str(tiny_bert_dir), num_labels=2)
    peft_model = PeftModel.from_pretrained(base.model, str(out)).eval()
    route_lily_layers(peft_model, "sample")  # as it was trained (the default routing)
    texts = [t for t, _ in _toy_rows(32, 1)]
    labels = torch.tensor([int(l == "pos") for _, l in _toy_rows(32, 1)])
    with torch.no_grad():
        acc = sum((peft_model(**encode_batch(base, texts[i:i + 16])).logits.argmax(-1) == labels[i:i + 16]).sum()
                  for i in (0, 16)).item() / 32
    sidecar = json.loads((out / "lily_deploy.json").read_text())
    assert acc == pytest.approx(sidecar["best"]["val_accuracy"])  # the saved adapter is the best one

    deploy = load_model(out)
    assert deploy.labels == ["neg", "pos"] and len(deploy.layers) == 8
    with torch.no_grad():
        batch = encode_batch(base, texts[:16])
        assert torch.allclose(deploy.logits(**batch), peft_model(**batch).logits, atol=1e-5)

    result = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["labels"] == ["neg", "pos"] and info["rank"] == 8 and info["num_hp"] == 4
    ckpt = out / "checkpoints" / "last"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 100
    assert {p.name for p in ckpt.iterdir()} == {"trainable.safetensors", "state.pt", "state.json"}


# ------------------------------------------------------------------ parameter counting and LoRA
def test_lily_param_count_matches_peft_and_lora_is_matched(tiny_roberta_dir):
    from peft import LilyConfig, get_peft_model

    from lily_deploy.core.models import load_base

    base = load_base(str(tiny_roberta_dir), num_labels=2)
    targets, adapted = resolve_targets(base.model, ["query", "value", "intermediate.dense"], "classifier", "tiny")
    assert len(adapted) == 12
    # stride 3 over 4 layers: uneven LP groups
    expected = lily_param_count(base.model, adapted, targets, rank=4, num_hp=3, stride=3)
    model = get_peft_model(base.model, LilyConfig(r=4, stride_A=3, num_B=3, scaling=1.0, target_modules=targets))
    counted = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lily_" in n)
    assert counted == expected
    rank, lora = lora_rank_for(base.model, adapted, expected)
    per_rank = lora // rank
    assert all(abs(lora - expected) <= abs(r * per_rank - expected) for r in range(1, 4 * rank))


def test_one_target_rule_for_adapting_counting_and_grouping(tiny_bert_dir):
    """target_of is PEFT's rule: adapted when the path is an entry or ends in ".entry"; grouped by the entry it ends with."""
    assert target_of("bert.encoder.layer.0.attention.self.query", ["query", "value"]) == "query"
    assert target_of("query", ["query"]) == "query"
    assert target_of("bert.encoder.layer.0.attention.self.myquery", ["query"]) is None  # no "." before it
    assert target_of("a.intermediate.dense", ["dense", "intermediate.dense"]) == "intermediate.dense"
    assert target_of("a.b.q", "re.*") == "re.*"  # PEFT's regex form: one group
    from lily_deploy.core.models import load_base

    base = load_base(str(tiny_bert_dir), num_labels=2)
    targets, adapted = resolve_targets(base.model, [" query", "value", "query"], "classifier", "tiny")
    assert targets == ["query", "value"] and len(adapted) == 8  # stripped, each entry once
    # a layer ending with two entries: PEFT groups it under either by set order, so it is refused
    with pytest.raises(LilyDeployError, match=r"targets 'dense' and 'output.dense' both end layer .*output\.dense"):
        resolve_targets(base.model, ["dense", "output.dense"], "classifier", "tiny")


def test_lora_baseline_at_matched_count(tiny_bert_dir, toy, tmp_path):
    result = finetune(model=str(tiny_bert_dir), train=toy["train"], val=toy["val"], output=tmp_path / "lora",
                      method="lora", rank=8, max_steps=4, batch_size=16, **QUIET)
    assert result.method == "lora" and result.lora_rank is not None
    # LoRA on the 8 q/v layers (32 -> 32): 64 parameters per rank
    assert result.adapter_params == result.lora_rank * 8 * 64
    assert abs(result.adapter_params - result.lily_params) <= 8 * 64 // 2  # within half a rank step
    assert result.head_params == 32 * 2 + 2
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == result.lora_rank
    fixed = finetune(FinetuneConfig(model=str(tiny_bert_dir), train=toy["train"], output=tmp_path / "lora2",
                                    method="lora", lora_rank=2, max_steps=1, batch_size=16, **QUIET))
    assert fixed.lora_rank == 2 and fixed.adapter_params == 2 * 8 * 64 and fixed.best_val_accuracy is None
    assert (tmp_path / "lora2" / "adapter_model.safetensors").is_file()  # no --val: the last step is kept


# ------------------------------------------------------------------ sample routing
def test_sample_routing_is_batch_invariant_and_matches_deploy(tiny_bert_dir, toy, tmp_path):
    from peft import PeftModel

    from lily_deploy.core.data import encode_batch
    from lily_deploy.core.deploy import load_model
    from lily_deploy.core.models import load_base

    out = tmp_path / "sample"
    finetune(model=str(tiny_bert_dir), train=toy["train"], val=toy["val"], output=out, routing="sample",
             max_steps=40, batch_size=16, rank=4, lr=0.05, **QUIET)
    assert json.loads((out / "lily_deploy.json").read_text())["routing"] == "sample"
    base = load_base(str(tiny_bert_dir), num_labels=2)
    peft_model = PeftModel.from_pretrained(base.model, str(out)).eval()
    texts = ["good", "the plot was really quite awful and very boring", "superb music"]
    with torch.no_grad():
        batch = encode_batch(base, texts)
        plain = peft_model(**batch).logits  # PEFT's own batch routing
        route_lily_layers(peft_model, "sample")
        together = peft_model(**batch).logits
        alone = torch.cat([peft_model(**encode_batch(base, [t])).logits for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(plain, together, atol=1e-4)  # the routing matters for this adapter
    deploy = load_model(out, mode="sample")
    with torch.no_grad():
        assert torch.allclose(deploy.logits(**batch), together, atol=1e-5)


# ------------------------------------------------------------------ resume
def test_resume_after_kill_matches_uninterrupted(tiny_roberta_dir, toy, tmp_path, monkeypatch):
    """Kill after step 5 (checkpoints at 3): resume loses steps 4-5 and ends where a clean run ends.

    The tiny RoBERTa has dropout, so this also checks that the RNG state comes back.
    """
    kwargs = dict(max_steps=8, batch_size=16, rank=4, lr=0.02, save_every=3, eval_every=4, seed=3, **QUIET)
    data = dict(model=str(tiny_roberta_dir), train=toy["train"], val=toy["val"])
    clean = finetune(output=tmp_path / "clean", **data, **kwargs)
    killed = tmp_path / "killed"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(training._FAULTS, "stop_after_step", 5)  # the private fault hook: killed after step 5
        finetune(output=killed, **data, **kwargs)
    assert json.loads((killed / "checkpoints" / "last" / "state.json").read_text())["step"] == 4  # the eval at 4
    args = ["finetune", "--model", str(tiny_roberta_dir), "--train", str(toy["train"]), "--val", str(toy["val"]),
            "-o", str(killed), "--max-steps", "8", "--batch-size", "16", "--rank", "4", "--lr", "0.02",
            "--save-every", "3", "--eval-every", "4", "--seed", "3", "--no-progress"]
    result = CliRunner().invoke(cli, args + ["--resume"])
    assert result.exit_code == 0, result.output
    assert "resume: from step 4 of 8" in result.output
    assert _max_diff(_ckpt_tensors(killed), _ckpt_tensors(tmp_path / "clean")) < 1e-6
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    resumed = [r["loss"] for r in log[log.index({"event": "resume", "step": 4}):] if "loss" in r and "event" not in r]
    assert resumed == pytest.approx(_losses(tmp_path / "clean")[4:], abs=1e-6)
    steps = [r["step"] for r in log if "loss" in r and "event" not in r]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # the steps after the checkpoint are not logged twice
    assert json.loads((killed / "lily_deploy.json").read_text())["best"]["val_accuracy"] == clean.best_val_accuracy

    # a resume with different settings is refused, naming them
    changed = CliRunner().invoke(cli, args[:-1] + ["--lr", "0.5", "--no-progress", "--resume"])
    assert changed.exit_code == 1 and "settings differ" in changed.output and "lr 0.5" in changed.output


# ------------------------------------------------------------------ distributed
def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lily_deploy.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_two_processes_match_one_for_sample_routing(tiny_bert_dir, toy, tmp_path):
    common = ["finetune", "--model", str(tiny_bert_dir), "--train", str(toy["train"]), "--val", str(toy["val"]),
              "--max-steps", "6", "--batch-size", "16", "--grad-accum", "2", "--rank", "4", "--lr", "0.02",
              "--eval-every", "3", "--routing", "sample", "--no-progress", "--device", "cpu"]
    proc = _torchrun(common + ["-o", str(tmp_path / "ddp")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "DDP: 2 processes (gloo), routing sample" in proc.stderr
    single = CliRunner().invoke(cli, common + ["-o", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    assert _max_diff(_ckpt_tensors(tmp_path / "ddp"), _ckpt_tensors(tmp_path / "one")) < 1e-5
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
    assert [e["val_accuracy"] for e in _evals(tmp_path / "ddp")] == [e["val_accuracy"] for e in _evals(tmp_path / "one")]
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "last" / "state.json").read_text())
    assert state["world_size"] == 2


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_batch_routing_mixes_per_process(tiny_bert_dir, toy, tmp_path):
    """With batch routing the two processes mix over their own halves, so the result differs from one process."""
    common = ["finetune", "--model", str(tiny_bert_dir), "--train", str(toy["train"]), "--val", str(toy["val"]),
              "--max-steps", "4", "--batch-size", "16", "--rank", "4", "--lr", "0.05", "--routing", "batch",
              "--no-progress", "--device", "cpu"]
    proc = _torchrun(common + ["-o", str(tmp_path / "ddp")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "each process mixes over its own local batch" in proc.stderr
    single = CliRunner().invoke(cli, common + ["-o", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    assert _max_diff(_ckpt_tensors(tmp_path / "ddp"), _ckpt_tensors(tmp_path / "one")) > 1e-4


def test_split_for_rank_covers_each_item_once():
    for n in (0, 1, 5, 16, 17):
        items = list(range(n))
        parts = [split_for_rank(items, r, 3) for r in range(3)]
        assert sum(parts, []) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ------------------------------------------------------------------ images
def test_image_folder_training(tiny_vit_dir, tmp_path):
    from PIL import Image

    from lily_deploy.core.deploy import load_model

    rng = random.Random(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls, colour in (("cat", (200, 30, 30)), ("dog", (30, 200, 30)), ("owl", (30, 30, 200))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colour)
                Image.new("RGB", (40, 40), jitter).save(folder / f"{i}.png")
    out = tmp_path / "vit"
    result = finetune(model=str(tiny_vit_dir), train=tmp_path / "train", val=tmp_path / "val", output=out,
                      targets=["q_proj", "v_proj"], rank=4, num_hp=2, max_steps=3, batch_size=6, routing="sample",
                      **QUIET)
    assert result.best_val_accuracy is not None
    sidecar = json.loads((out / "lily_deploy.json").read_text())
    assert sidecar["task"] == "image-cls" and sidecar["labels"] == ["cat", "dog", "owl"]
    model = load_model(out)
    assert model.task == "image-cls" and model.labels == ["cat", "dog", "owl"] and len(model.layers) == 4


# ------------------------------------------------------------------ bad input (through the CLI)
def _run_cli(model: Path, train: Path, val: Path, out: Path, *extra: str):
    result = CliRunner().invoke(cli, ["finetune", "--model", str(model), "--train", str(train), "--val", str(val),
                                      "-o", str(out), "--max-steps", "2", "--batch-size", "8", "--no-progress",
                                      *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_empty_training_data(tiny_bert_dir, toy, tmp_path):
    train = write_tsv(tmp_path / "empty.tsv", [])
    line = _error_line(_run_cli(tiny_bert_dir, train, toy["val"], tmp_path / "o"))
    assert "--train" in line and "empty.tsv" in line and "no data rows" in line
    assert not (tmp_path / "o").exists()


def test_one_class_training_data(tiny_bert_dir, toy, tmp_path):
    train = write_tsv(tmp_path / "one.tsv", [(t, "pos") for t, _ in _toy_rows(10, 0)])
    line = _error_line(_run_cli(tiny_bert_dir, train, toy["val"], tmp_path / "o"))
    assert "one.tsv" in line and "'pos'" in line and "at least 2 classes" in line


def test_val_label_not_in_train(tiny_bert_dir, toy, tmp_path):
    val = write_tsv(tmp_path / "val.tsv", [("good film", "pos"), ("so so", "meh")])
    line = _error_line(_run_cli(tiny_bert_dir, toy["train"], val, tmp_path / "o"))
    assert "--val" in line and "row 2" in line and "'meh'" in line and "neg, pos" in line


def test_missing_text_column(tiny_bert_dir, toy, tmp_path):
    line = _error_line(_run_cli(tiny_bert_dir, toy["train"], toy["val"], tmp_path / "o", "--text-column", "review"))
    assert "--train" in line and "'review'" in line and "--text-column" in line and "sentence, label" in line
    train = write_tsv(tmp_path / "cols.tsv", [("x", "pos"), ("y", "neg")], header=("body", "label"))
    line = _error_line(_run_cli(tiny_bert_dir, train, toy["val"], tmp_path / "o"))
    assert "cols.tsv" in line and "no text column" in line


def test_targets_matching_nothing_list_the_linears(tiny_bert_dir, toy, tmp_path):
    line = _error_line(_run_cli(tiny_bert_dir, toy["train"], toy["val"], tmp_path / "o", "--targets", "query,qkv"))
    assert line.startswith("error: targets 'qkv' matches no Linear module")
    assert "bert.encoder.layer.{0..3}.attention.self.query" in line and "intermediate.dense" in line
    assert "layer.0." not in line  # abbreviated: one entry per kind of layer


def test_nan_loss_stops_with_clear_message(tiny_bert_dir, toy, tmp_path):
    line = _error_line(_run_cli(tiny_bert_dir, toy["train"], toy["val"], tmp_path / "o", "--lr", "1e30",
                                "--warmup", "0", "--max-grad-norm", "0", "--max-steps", "20"))
    assert "training diverged at step" in line and "nan" in line.lower() and "Lower --lr (now 1e+30)" in line


def test_nan_loss_keeps_last_good_checkpoint(tiny_bert_dir, toy, tmp_path, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setattr(training._FAULTS, "nan_at_step", 5)  # the private fault hook: step 5's loss is NaN
    with pytest.raises(LilyDeployError, match=r"diverged at step 5: the loss is nan.*checkpoint \(step 4\)"):
        finetune(model=str(tiny_bert_dir), train=toy["train"], val=toy["val"], output=out, max_steps=10,
                 batch_size=16, rank=4, save_every=2, eval_every=4, **QUIET)
    assert json.loads((out / "checkpoints" / "last" / "state.json").read_text())["step"] == 4
    assert all(torch.isfinite(t).all() for t in _ckpt_tensors(out).values())
    assert json.loads((out / "lily_deploy.json").read_text())["best"]["step"] == 4
    assert not any(p.name.endswith(".partial") for p in out.rglob("*"))


def test_output_folder_rules(tiny_bert_dir, toy, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    line = _error_line(_run_cli(tiny_bert_dir, toy["train"], toy["val"], out))
    assert "not empty" in line and "--resume" in line and "--overwrite" in line
    line = _error_line(_run_cli(tiny_bert_dir, toy["train"], toy["val"], tmp_path / "fresh", "--resume"))
    assert "--resume" in line and "checkpoints/last" in line
    line = _error_line(_run_cli(tiny_bert_dir, toy["train"], toy["val"], tmp_path / "no" / "such" / "o"))
    assert "-o" in line and "does not exist" in line
    # an input is never an output: --overwrite would have emptied the model's folder
    line = _error_line(_run_cli(tiny_bert_dir, toy["train"], toy["val"], tiny_bert_dir, "--overwrite"))
    assert "-o" in line and "is the input --model" in line and (tiny_bert_dir / "config.json").is_file()
    line = _error_line(_run_cli(tiny_bert_dir, toy["train"], toy["val"], tiny_bert_dir / "adapter"))
    assert "lies inside the input --model" in line and not (tiny_bert_dir / "adapter").exists()


# ------------------------------------------------------------------ the config
def _usage_error(result, flag: str) -> str:
    """A bad value is a usage error (exit 2) that names the flag, with no traceback."""
    assert result.exit_code == 2, result.output
    assert f"'{flag}'" in result.output and "Traceback" not in result.output, result.output
    return result.output


def test_cli_refuses_bad_settings_naming_the_flag(tiny_bert_dir, toy, tmp_path):
    out = tmp_path / "o"
    text = _usage_error(_run_cli(tiny_bert_dir, toy["train"], toy["val"], out, "--method", "lora",
                                 "--routing", "sample"), "--routing")
    assert "sample applies to Lily only" in text
    for flag, value, detail in (("--rank", "0", "must be >= 1"), ("--lr", "nan", "finite"),
                                ("--epochs", "0", "must be > 0"), ("--warmup", "-1", "must be >= 0"),
                                ("--max-grad-norm", "inf", "finite"), ("--max-length", "0", "must be >= 1"),
                                ("--train-size", "0", "must be >= 1"), ("--device", "gpu", "cuda:N"),
                                ("--targets", ",", "module names"), ("--seed", "-1", "must be >= 0")):
        text = _usage_error(_run_cli(tiny_bert_dir, toy["train"], toy["val"], out, flag, value), flag)
        assert detail in text, (flag, text)
    assert not out.exists()


def test_config_refuses_bad_fields_naming_them(tmp_path):
    need = dict(model="m", train="t.tsv", output=tmp_path / "o")
    cases = [({"method": "lora", "routing": "sample"}, "routing", "applies to Lily only"),
             ({"rank": 0}, "rank", "must be >= 1"), ({"rank": 2.0}, "rank", "integer"),
             ({"lr": float("nan")}, "lr", "finite"), ({"scale": float("inf")}, "scale", "finite"),
             ({"epochs": 0}, "epochs", "must be > 0"), ({"max_grad_norm": -1.0}, "max_grad_norm", ">= 0"),
             ({"targets": "query,value"}, "targets", "list of module names"), ({"targets": [" "]}, "targets", "module names"),
             ({"device": "cuda:x"}, "device", "expected cpu"), ({"routing": "token"}, "routing", "choose one of"),
             ({"eval_every": 0}, "eval_every", ">= 1"), ({"text_column": ""}, "text_column", "column name"),
             ({"model": ""}, "model", "expected a path")]
    for changes, name, detail in cases:
        with pytest.raises(ConfigError) as info:
            FinetuneConfig(**{**need, **changes})
        assert info.value.field == name and detail in str(info.value) and str(info.value).startswith(name + ":")
        with pytest.raises(ConfigError):  # the keyword form validates the same way, before any work
            finetune(**{**need, **changes})
    with pytest.raises(TypeError, match="_stop_after_step"):  # the test faults are not part of the API
        finetune(**need, _stop_after_step=1)


def test_config_defaults_and_resolve(tmp_path):
    config = FinetuneConfig(model="m", train="t.tsv", output=tmp_path / "o")
    assert config.epochs == 3.0 and config.device == "auto" and config.val is None and config.max_grad_norm == 1.0
    assert FinetuneConfig.resolve(config, rank=4) == config.replace(rank=4) and config.rank == 16
    schedule = training.Schedule.plan(config, rows=100)  # 4 batches of 32 an epoch, 3 epochs, 6% warm-up
    assert (schedule.steps_per_epoch, schedule.total, schedule.warmup_steps, schedule.eval_every) == (4, 12, 1, 4)
    assert training.Schedule.plan(config.replace(max_steps=5, warmup=2, grad_accum=2), rows=100).total == 5


def test_abbreviate_collapses_layer_indices():
    names = [f"enc.layer.{i}.attn.{p}" for i in range(3) for p in ("q", "v")] + ["pool.dense"]
    assert abbreviate(names) == "enc.layer.{0..2}.attn.q, enc.layer.{0..2}.attn.v, pool.dense"
    assert abbreviate(["a.1.x", "a.3.x"]) == "a.{1,3}.x"
    assert abbreviate([f"m{i}" for i in range(20)], limit=3).endswith("... (17 more)")
