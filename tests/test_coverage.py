"""The coverage script's fast part: the architectures and tasks that needed more than sequence classification
(shared layers, mixed HPMix variants, per-token outputs, QA, seq2seq, Conv1D) through inspect -> export -> parity."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import coverage as cov  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ("inspect", "export", "parity")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """One coverage run of the cases below (inspect, export, parity), shared by the checks."""
    names = ["albert", "deberta-v2", "bert-token-cls", "bert-qa", "t5", "gpt2"]
    work = tmp_path_factory.mktemp("coverage")
    return {n: cov.run_case(cov.CASES_BY_NAME[n], work / n, FAST, trt=False) for n in names} | {"_work": work}


@pytest.mark.parametrize("name", ["albert", "deberta-v2", "bert-token-cls", "bert-qa"])
def test_case_passes_inspect_export_parity(rows, name):
    row = rows[name]
    assert [row.stages[s] for s in FAST] == ["ok"] * 3, row.details


def test_seq2seq_loads_and_export_refuses_in_one_line(rows):
    row = rows["t5"]
    assert row.stages["inspect"] == "ok" and row.stages["export"] == "refused"
    assert "not encoder-decoders yet" in row.details["export"]


def test_gpt2_is_refused_naming_conv1d(rows):
    assert rows["gpt2"].stages["inspect"] == "refused"
    assert "Conv1D" in rows["gpt2"].details["inspect"]


def test_albert_exports_one_node_per_call_of_its_shared_layer(rows):
    from lily_deploy.converters.hpmix import hpmix_nodes

    model = onnx.load(str(rows["_work"] / "albert" / "model.onnx"))
    layers = 2  # query and value of the one shared ALBERT layer
    assert len(hpmix_nodes(model)) == layers * cov.CASES_BY_NAME["albert"].config["num_hidden_layers"]


def test_deberta_carries_one_function_body_per_variant(rows):
    from lily_deploy.converters.hpmix import hpmix_nodes

    model = onnx.load(str(rows["_work"] / "deberta-v2" / "model.onnx"))
    names = sorted(f.name for f in model.functions)
    assert names == ["HPMix", "HPMix_sample"]  # masked tokens; relative position embeddings without a mask
    used = {n.op_type for n in hpmix_nodes(model)}
    assert used == set(names)
    onnx.checker.check_model(model, full_check=True)


def test_task_outputs_are_named_and_shaped(rows):
    from lily_deploy.runtime.ort import OrtRunner

    qa = OrtRunner(rows["_work"] / "bert-qa" / "model.onnx")
    assert list(qa.output_names) == ["start_logits", "end_logits"]
    tok = OrtRunner(rows["_work"] / "bert-token-cls" / "model.onnx")
    feeds = {"input_ids": np.array([[101, 2023, 2003, 102, 0]]), "attention_mask": np.array([[1, 1, 1, 1, 0]]),
             "token_type_ids": np.zeros((1, 5), dtype=np.int64)}
    feeds = {k: v for k, v in feeds.items() if k in tok.input_names}
    assert tok.infer(feeds)["logits"].shape == (1, 5, 3)  # per token


def test_table_lists_every_stage(rows):
    table = cov.format_table([rows["albert"], rows["t5"]])
    assert all(s in table.splitlines()[0] for s in cov.STAGES)
    assert "t5 export:" in table and "albert" in table


@pytest.mark.slow
def test_every_case_through_the_whole_chain(tmp_path):
    """The full script: every architecture and task, every stage (minutes)."""
    rows = [cov.run_case(c, tmp_path / c.name) for c in cov.CASES]
    failed = {r.case.name: r.details for r in rows if "FAIL" in r.stages.values()}
    assert not failed, cov.format_table(rows)
