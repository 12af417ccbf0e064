"""quickstart: the whole pipeline on the embedded default; an interruption resumes cleanly."""
from __future__ import annotations

import json

from click.testing import CliRunner

from lily_deploy.cli import cli
from lily_deploy.datasets import write_reviews


def test_embedded_data_set_is_seeded_and_disjoint(tmp_path):
    a_train, a_val = write_reviews(tmp_path / "a", n_train=200, n_val=50)
    b_train, _ = write_reviews(tmp_path / "b", n_train=200, n_val=50)
    assert a_train.read_text() == b_train.read_text()
    train = {l.split("\t")[0] for l in a_train.read_text().splitlines()[1:]}
    val = {l.split("\t")[0] for l in a_val.read_text().splitlines()[1:]}
    assert len(train) == 200 and len(val) == 50 and not train & val
    labels = [l.split("\t")[1] for l in a_train.read_text().splitlines()[1:]]
    assert 0.3 < labels.count("positive") / len(labels) < 0.7


def test_quickstart_interrupted_then_resumed(tmp_path, monkeypatch):
    import lily_deploy.precision

    out = tmp_path / "qs"
    args = ["quickstart", "-o", str(out), "--steps", "40", "--no-bench"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lily_deploy.precision, "quantize", interrupted)
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 130 and "interrupted" in first.output
    state = json.loads((out / "quickstart_state.json").read_text())
    assert {"finetune", "fold", "export"} <= set(state) and "quantize" not in state
    assert not (out / "model.int8.onnx").exists()
    assert not [p for p in out.rglob("*") if ".partial" in p.name]  # nothing half-written
    monkeypatch.undo()

    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert "== finetune (done in an earlier run: kept)" in second.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["finetune"]["val_accuracy"] > 0.7  # two balanced classes: chance is 0.5
    assert summary["parity"]["passed"] and (out / "model.int8.onnx").exists()
    assert "parity" in second.output and "model.int8.onnx" in second.output
