"""Train as deployed: ``export`` says when it deploys another routing than the adapter was trained with.

The measured difference (torch logits under the trained vs the deployed routing, on the
validation inputs) is reported in the export's notes; an adapter exported with its own routing
gets no such note.
"""
from __future__ import annotations

import json
import re
import shutil

from click.testing import CliRunner

from lily_deploy.cli import cli


def _with_routing(adapter, folder, routing: str):
    shutil.copytree(adapter, folder)
    sidecar = folder / "lily_deploy.json"
    data = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    data["routing"] = routing
    sidecar.write_text(json.dumps(data))
    return folder


def test_batch_trained_adapter_exported_with_sample_says_how_far_it_moves(tiny_roberta_adapter, tmp_path):
    adapter = _with_routing(tiny_roberta_adapter, tmp_path / "batch_trained", "batch")
    result = CliRunner().invoke(cli, ["export", str(adapter), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if "trained with batch routing" in l)
    assert "exported with sample" in line and "--routing batch deploys what was trained" in line
    moved = float(re.search(r"move by up to ([0-9.e+-]+)", line).group(1))
    assert moved > 1e-6  # batch routing mixes over the padded batch: the validation batch of 4 differs
    assert re.search(r"on the \d+ validation rows", line)


def test_adapter_exported_with_its_own_routing_gets_no_note(tiny_roberta_adapter, tmp_path):
    adapter = _with_routing(tiny_roberta_adapter, tmp_path / "sample_trained", "sample")
    result = CliRunner().invoke(cli, ["export", str(adapter), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "trained with" not in result.output
    result = CliRunner().invoke(cli, ["export", str(adapter), "-o", str(tmp_path / "b.onnx"), "--routing", "batch"])
    assert result.exit_code == 0, result.output
    assert "trained with sample routing, exported with batch" in result.output


def test_parity_reports_the_drift_of_a_reference_trained_with_another_routing(tiny_roberta_adapter, tmp_path):
    adapter = _with_routing(tiny_roberta_adapter, tmp_path / "batch_trained", "batch")
    onnx = tmp_path / "m.onnx"
    assert CliRunner().invoke(cli, ["export", str(adapter), "-o", str(onnx)]).exit_code == 0
    result = CliRunner().invoke(cli, ["parity", "--reference", str(adapter), "--candidate", str(onnx)])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if "was trained with batch routing" in l)
    assert "compared under sample" in line and "keep their top-1 class" in line
