"""Loading what users bring: the task's own model class, no silent random weights, default targets for every
architecture, new heads trained, and image folders end to end (tiny random configs of real HF models)."""
from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lily_deploy.cli import cli
from lily_deploy.core.errors import LilyDeployError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import coverage as cov  # noqa: E402  (the coverage script's tiny configs)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(name)``: the coverage case ``name`` saved once as a Hugging Face folder."""
    made = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = cov.save_tiny_model(cov.CASES_BY_NAME[name], tmp_path_factory.mktemp(name) / "base")
        return made[name]

    return make


def _bare_base(name: str, out: Path) -> Path:
    """The backbone of case ``name`` alone (``AutoModel``: no head), as a pretrained checkpoint is shipped."""
    import transformers

    from lily_deploy.core.models import minilm_path

    case = cov.CASES_BY_NAME[name]
    torch.manual_seed(0)
    transformers.AutoModel.from_config(transformers.AutoConfig.for_model(case.model_type, **case.config)) \
        .save_pretrained(str(out))
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(str(out))
    return out


def _adapter(base: Path, out: Path, task: str, targets=("query", "value"), num_labels=3) -> Path:
    from lily_deploy.core.adapters import random_lily_adapter

    return random_lily_adapter(str(base), out, list(targets), num_labels=num_labels, task=task, rank=4, num_hp=2,
                               scale=2.0)


def _texts(model, n=3):
    enc = model.tokenizer(["a film", "the plot and the acting were great", "it"][:n], padding=True,
                          return_tensors="pt")
    return {k: v for k, v in enc.items() if k in model.input_names}


@pytest.mark.parametrize("task, cls, peft_task", [("token-cls", "BertForTokenClassification", "TOKEN_CLS"),
                                                  ("qa", "BertForQuestionAnswering", "QUESTION_ANS")])
def test_adapter_loads_as_the_class_it_was_trained_for(tiny, tmp_path, task, cls, peft_task):
    from lily_deploy.core.deploy import load_model

    adapter = _adapter(tiny("bert"), tmp_path / "adapter", task, num_labels=None if task == "qa" else 5)
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == peft_task
    first, second = load_model(adapter), load_model(adapter)
    assert type(first.model).__name__ == cls and first.task == task
    batch = _texts(first)
    one, two = first.outputs(**batch), second.outputs(**batch)
    assert list(one) == first.output_names
    for name in one:  # nothing random: two loads give the same outputs
        assert torch.equal(one[name], two[name])
    if task == "token-cls":
        assert tuple(one["logits"].shape) == (*batch["input_ids"].shape, 5)  # per token
    else:
        assert first.output_names == ["start_logits", "end_logits"]
        assert tuple(one["start_logits"].shape) == tuple(batch["input_ids"].shape)


def test_architectures_in_config_pick_the_task(tiny):
    from lily_deploy.core.models import load_base

    assert load_base(str(tiny("bert-token-cls")), num_labels=3).task == "token-cls"
    assert load_base(str(tiny("bert-qa"))).task == "qa"
    t5 = load_base(str(tiny("t5")))
    assert t5.task == "seq2seq" and type(t5.model).__name__ == "T5ForConditionalGeneration"


def test_random_weights_left_by_a_load_are_refused_in_one_line(tmp_path):
    """An adapter that does not carry the head its base lacks: every load would draw another head."""
    from peft import LilyConfig, get_peft_model

    from lily_deploy.core.adapters import load_adapter
    from lily_deploy.core.models import load_base

    base = _bare_base("bert", tmp_path / "base")
    loaded = load_base(str(base), task="seq-cls", num_labels=2)
    assert loaded.new_weights == ["classifier.bias", "classifier.weight"]
    cfg = LilyConfig(r=4, num_B=2, stride_A=1, target_modules=["query", "value"], init_weights=False)
    get_peft_model(loaded.model, cfg).save_pretrained(str(tmp_path / "adapter"))  # no head saved
    with pytest.raises(LilyDeployError, match="classifier.weight would be initialised at random"):
        load_adapter(tmp_path / "adapter")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "adapter")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "initialised at random" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("name, expected", [("distilbert", ["q_lin", "v_lin"]), ("modernbert", ["Wqkv"]),
                                            ("phi3", ["qkv_proj"]), ("albert", ["query", "value"]),
                                            ("vit", ["q_proj", "v_proj"]), ("swin", ["q_proj", "v_proj"]),
                                            ("deberta-v2", ["query_proj", "value_proj"]),
                                            ("bert", ["query", "value"])])
def test_default_targets_for_every_architecture(tiny, name, expected):
    assert cov.default_targets_of(tiny(name), cov.CASES_BY_NAME[name].task) == expected


def test_gpt2_says_conv1d_and_a_model_without_projections_lists_its_linears(tiny):
    from torch import nn

    from lily_deploy.training import default_targets, linear_modules

    with pytest.raises(LilyDeployError, match="Conv1D .*which PEFT's Lily refuses"):
        cov.default_targets_of(tiny("gpt2"), "seq-cls")

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(4, 4)
            self.gate = nn.Linear(4, 4)

    odd = Odd()
    with pytest.raises(LilyDeployError, match="no default targets .*its Linear modules are: mixer, gate"):
        default_targets(odd, "odd", linear_modules(odd, None), False)


@pytest.mark.parametrize("name, new", [("distilbert", ["classifier", "pre_classifier"]),
                                       ("deberta-v2", ["classifier", "pooler"]),
                                       ("modernbert", ["classifier", "head"])])
def test_new_head_modules_are_found(tmp_path, name, new):
    from lily_deploy.core.models import load_base, new_modules

    base = load_base(str(_bare_base(name, tmp_path / "base")), task="seq-cls", num_labels=2)
    assert new_modules(base.model, base.new_weights) == new


def _toy(path: Path) -> Path:
    return cov.write_text_data(path, rows=16)


def test_finetune_trains_every_new_head_module_with_default_targets(tmp_path):
    """DistilBERT from its bare backbone: default targets q_lin/v_lin, classifier and pre_classifier trained."""
    from lily_deploy.core.deploy import load_model

    base = _bare_base("distilbert", tmp_path / "base")
    data = _toy(tmp_path / "toy.tsv")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "--model", str(base), "--train", str(data), "--val", str(data),
                                      "-o", str(out), "--max-steps", "3", "--batch-size", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "targets q_lin, v_lin (the attention projections among distilbert's Linear layers" in result.output
    assert "trained in full, newly initialised by the base load: classifier, pre_classifier" in result.output
    saved = set(json.loads((out / "adapter_config.json").read_text())["modules_to_save"])
    assert {"classifier", "pre_classifier"} <= saved
    first, second = load_model(out), load_model(out)  # loads (nothing left random), twice the same
    batch = _texts(first)
    assert torch.equal(first.logits(**batch), second.logits(**batch))


def test_pillow_is_a_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.lower().startswith("pillow") for d in deps)


def test_image_folder_finetune_export_parity_and_inspect(tiny, tmp_path):
    """A generated PNG folder through finetune -> export -> parity on a tiny ViT, and inspect on it and an .npz."""
    images = cov.write_image_folder(tmp_path / "images", size=32, per_label=4)
    out, onnx = tmp_path / "vit-run", tmp_path / "vit.onnx"
    run = CliRunner()
    result = run.invoke(cli, ["finetune", "--model", str(tiny("vit")), "--train", str(images), "--val", str(images),
                              "-o", str(out), "--max-steps", "2", "--batch-size", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "targets q_proj, v_proj" in result.output
    result = run.invoke(cli, ["export", str(out), "-o", str(onnx)])
    assert result.exit_code == 0, result.output
    result = run.invoke(cli, ["parity", "--reference", str(out), "--candidate", str(onnx), "--data", str(images)])
    assert result.exit_code == 0 and "PASSED" in result.output, result.output
    result = run.invoke(cli, ["quantize", str(onnx), "-o", str(tmp_path / "vit.int8.onnx"), "--int8", "--calib",
                              str(images), "--max-accuracy-drop", "100"])  # a 2-step model: the path, not accuracy
    assert result.exit_code == 0, result.output
    result = run.invoke(cli, ["inspect", str(out), "--data", str(images), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["router_stats"]
    npz = tmp_path / "pixels.npz"
    np.savez(npz, pixel_values=np.random.default_rng(0).uniform(-1, 1, (5, 3, 32, 32)).astype(np.float32))
    result = run.invoke(cli, ["inspect", str(out), "--data", str(npz), "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["router_stats"]) == 4
    np.savez(tmp_path / "bad.npz", other=np.zeros(3))
    result = run.invoke(cli, ["inspect", str(out), "--data", str(tmp_path / "bad.npz")])
    assert result.exit_code == 1 and "no array for model input pixel_values" in result.output


def test_minilm_as_causal_lm_trains_its_new_head_transform_and_loads_back(tmp_path):
    """BERT as a decoder: its LM head transform is new (trained in full), the tied biases are constants."""
    from lily_deploy.core.deploy import load_model
    from lily_deploy.training import finetune

    rows = [{"prompt": f"Review: film {i}\nSentiment:", "response": " positive" if i % 2 else " negative"}
            for i in range(8)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = finetune(model="minilm", task="causal-lm", train=str(tmp_path / "t.jsonl"), val=str(tmp_path / "t.jsonl"),
                      output=str(tmp_path / "o"), max_steps=1, batch_size=4, progress=False)
    assert result.head_params == 384 * 384 + 384 + 2 * 384  # transform: dense + LayerNorm
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["modules_to_save"] == \
        ["cls.predictions.transform"]
    assert load_model(tmp_path / "o").task == "causal-lm"
