"""Fold: exact folds for static-by-design layers, auto within budget, checkpoints that inspect/export load."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import SENTENCES, data_file
from lily_deploy.cli import cli
from lily_deploy.core.deploy import load_model, save_deploy
from lily_deploy.core.config import ConfigError
from lily_deploy.folding import FoldConfig, fold
from lily_deploy.onnx_export import export_onnx


def _batch(model, texts=SENTENCES):
    enc = model.tokenizer(list(texts), padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in model.input_names}


def test_fold_auto_cli_writes_checkpoint_and_report(minilm_adapter, tmp_path):
    dev = data_file("sst2", "dev.tsv")
    out = tmp_path / "folded"
    r = CliRunner().invoke(cli, ["fold", str(minilm_adapter), "--calib", str(dev), "--calib-size", "48",
                                 "-o", str(out), "--max-metric-drop", "0.1"])
    assert r.exit_code == 0, r.output
    assert "layers folded (auto)" in r.output and "spread" in r.output
    report = json.loads((out / "fold_report.json").read_text())
    assert len(report["layers"]) == 12 and report["metric_name"] == "accuracy"
    assert report["metric_before"] - report["metric_after"] <= 0.1 + 1e-9
    for layer in report["layers"]:
        assert set(layer) >= {"name", "folded", "reason", "spread", "output_error", "mean_p"}
    model = load_model(out)
    assert len(model.folded) == report["folded_layers"] and len(model.layers) == report["dynamic_layers"]
    for name in model.folded:
        assert type(model.model.get_submodule(name)) is torch.nn.Linear
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "folded" in r.output


def test_exact_fold_of_static_by_design_layers(minilm_adapter, tmp_path):
    model = load_model(minilm_adapter, mode="sample")
    names = list(model.layers)
    with torch.no_grad():
        model.layers[names[0]].router.weight.zero_()          # uniform mixing
        model.layers[names[1]].set_static(torch.tensor([0.1, 0.6, 0.3]))  # frozen by design
    save_deploy(model, tmp_path / "ckpt")
    with torch.no_grad():
        before = load_model(tmp_path / "ckpt").logits(**_batch(model))
    report = fold(source=tmp_path / "ckpt", output=tmp_path / "out", strategy="none", random_inputs=True, size=8, progress=False)
    decisions = {d.name: d for d in report.layers}
    assert decisions[names[0]].reason.startswith("exact") and not decisions[names[0]].folded  # none: report only
    report = fold(source=tmp_path / "ckpt", output=tmp_path / "out", strategy="auto", max_output_error=0.0, random_inputs=True,
                  size=8, progress=False)
    decisions = {d.name: d for d in report.layers}
    assert decisions[names[0]].folded and "zero router" in decisions[names[0]].reason
    assert decisions[names[1]].folded and "static mode" in decisions[names[1]].reason
    assert decisions[names[1]].mean_p == pytest.approx([0.1, 0.6, 0.3], abs=1e-6)
    assert sum(d.folded for d in report.layers) == 2  # zero output-error budget: nothing else
    folded = load_model(tmp_path / "out")
    with torch.no_grad():
        after = folded.logits(**_batch(model))
    assert (after - before).abs().max() <= 1e-5  # exact


def test_fold_all_exports_as_plain_graph(minilm_adapter, tmp_path):
    report = fold(source=minilm_adapter, output=tmp_path / "all", strategy="all", random_inputs=True, size=8, progress=False)
    assert len(report.folded) == 12
    result = export_onnx(source=tmp_path / "all", output=tmp_path / "all.onnx")
    assert result.passed and result.dynamic_layers == 0 and result.folded_layers == 12
    m = onnx.load(str(tmp_path / "all.onnx"))
    assert not m.functions and not any(n.domain == "lily" for n in m.graph.node)
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["lily_deploy.fold"])["folded_layers"] == 12


def test_partial_fold_exports_mixed_graph(minilm_adapter, tmp_path):
    model = load_model(minilm_adapter, mode="sample")
    for name in list(model.layers)[:5]:
        model.layers[name].set_static(torch.tensor([1 / 3, 1 / 3, 1 / 3]))
    save_deploy(model, tmp_path / "ckpt")
    fold(source=tmp_path / "ckpt", output=tmp_path / "part", strategy="auto", max_output_error=0.0, random_inputs=True, size=4,
         progress=False)
    result = export_onnx(source=tmp_path / "part", output=tmp_path / "part.onnx")
    assert result.passed and result.folded_layers == 5 and result.dynamic_layers == 7
    m = onnx.load(str(tmp_path / "part.onnx"))
    assert sum(n.domain == "lily" for n in m.graph.node) == 7


def test_fold_bad_input(minilm_adapter, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["fold", str(minilm_adapter), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--calib" in r.output
    r = runner.invoke(cli, ["fold", str(minilm_adapter), "--calib", str(tmp_path / "none.tsv"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "none.tsv does not exist" in r.output
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nbad film\tmaybe\n")
    r = runner.invoke(cli, ["fold", str(minilm_adapter), "--calib", str(bad), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "row 2 has label 'maybe'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["source", "inside", "calib"])
def test_fold_never_writes_over_an_input(minilm_adapter, tmp_path, target):
    calib = tmp_path / "calib.tsv"
    calib.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    output = {"source": minilm_adapter, "inside": minilm_adapter / "folded", "calib": calib}[target]
    before, calib_before = _tree(minilm_adapter), calib.read_bytes()
    r = CliRunner().invoke(cli, ["fold", str(minilm_adapter), "--calib", str(calib), "-o", str(output)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "input" in r.output and str(output) in r.output
    assert _tree(minilm_adapter) == before and calib.read_bytes() == calib_before
    assert not (minilm_adapter / "folded").exists()


@pytest.mark.parametrize("flag, value, field", [
    ("--max-metric-drop", "-1", "max_metric_drop"), ("--max-metric-drop", "nan", "max_metric_drop"),
    ("--max-output-error", "inf", "max_output_error"), ("--calib-size", "0", "size"), ("--batch-size", "0", "batch_size"),
    ("--max-length", "0", "max_length"),
])
def test_fold_config_errors_name_the_flag_and_the_field(minilm_adapter, tmp_path, flag, value, field):
    r = CliRunner().invoke(cli, ["fold", str(minilm_adapter), "--random-inputs", "-o", str(tmp_path / "o"), flag, value])
    assert r.exit_code == 2 and f"'{flag}'" in r.output and "Traceback" not in r.output, r.output
    number = float(value) if field in ("max_metric_drop", "max_output_error") else int(value)
    with pytest.raises(ConfigError) as exc:
        FoldConfig(source=minilm_adapter, output=tmp_path / "o", random_inputs=True, **{field: number})
    assert exc.value.field == field and str(exc.value).startswith(f"{field}: ")
    assert not (tmp_path / "o").exists()


def test_fold_config_cross_field_rules(minilm_adapter, tmp_path):
    with pytest.raises(ConfigError) as exc:
        FoldConfig(source=minilm_adapter, output=tmp_path / "o")  # neither calibration data nor random inputs
    assert exc.value.field == "calib"
    for bad in ({"strategy": "some"}, {"routing": "static"}):
        with pytest.raises(ConfigError) as exc:
            fold(source=minilm_adapter, output=tmp_path / "o", random_inputs=True, **bad)
        assert exc.value.field == next(iter(bad))
    assert not (tmp_path / "o").exists()
