"""``export -o DIR/``: a folder Hugging Face tools load without lily-deploy (Optimum's layout).

The packaged MiniLM with a non-zero Lily adapter is exported into a folder; Optimum's
``ORTModelForSequenceClassification`` (and a transformers pipeline over it) must give the
logits of the torch reference that ``lily-deploy parity`` compares against, and parity on the
folder's graph must pass.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lily_deploy.cli import cli

TEXTS = ["a gripping , beautiful film", "the plot was not clever at all , and the ending dragged",
         "i would not say the cast was dull", "great"]


@pytest.fixture(scope="module")
def folder(minilm_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "deploy"
    result = CliRunner().invoke(cli, ["export", str(minilm_adapter), "-o", f"{out}/"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    return out


def _reference_logits(adapter, texts) -> np.ndarray:
    from lily_deploy.core.deploy import open_model

    deploy = open_model(str(adapter))
    deploy.set_routing("sample")
    enc = deploy.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return deploy(**dict(enc)).logits.float().numpy()


def test_folder_holds_graph_config_and_tokenizer(folder, minilm_adapter):
    from transformers import AutoConfig

    from lily_deploy.core.deploy import open_model

    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer_config.json"} <= names
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    labels = open_model(str(minilm_adapter)).labels
    assert AutoConfig.from_pretrained(str(folder)).id2label == dict(enumerate(labels))
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".partial")]


def test_plain_onnxruntime_and_transformers_read_the_folder(folder, minilm_adapter):
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    assert AutoConfig.from_pretrained(str(folder)).num_labels == 2
    enc = tok(TEXTS, padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    got = sess.run(["logits"], feed)[0]
    np.testing.assert_allclose(got, _reference_logits(minilm_adapter, TEXTS), atol=1e-4)


def test_optimum_loads_the_folder_and_matches_parity(folder, minilm_adapter, tmp_path):
    optimum = pytest.importorskip("optimum.onnxruntime", reason="optimum's onnxruntime support is not installed")
    from transformers import AutoTokenizer, pipeline

    model = optimum.ORTModelForSequenceClassification.from_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    got = model(**enc).logits.detach().numpy()
    np.testing.assert_allclose(got, _reference_logits(minilm_adapter, TEXTS), atol=1e-4)
    classify = pipeline("text-classification", model=model, tokenizer=tok)
    labels = [r["label"] for r in classify(TEXTS)]
    assert labels == [model.config.id2label[int(i)] for i in got.argmax(-1)]

    result = CliRunner().invoke(cli, ["parity", "--reference", str(minilm_adapter), "--candidate",
                                      str(folder / "model.onnx")])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output


def test_a_decoder_folder_is_refused_and_nothing_written(llama_adapter, tmp_path):
    out = tmp_path / "dec"
    result = CliRunner().invoke(cli, ["export", str(llama_adapter), "-o", f"{out}/"])
    assert result.exit_code == 1
    assert "give -o FILE.onnx" in result.output and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
