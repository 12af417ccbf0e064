"""Bad input is one line and loses nothing: schema checks, OS errors, Ctrl-C, permissions, outputs vs inputs.

Property-based tests throw random and mutated inputs at the data readers, the JSON schema
checks and the flag parsers: each ends in a result or a LilyDeployError, never another exception.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lily_deploy.cli import cli
from lily_deploy.core import schema
from lily_deploy.core.data import read_text_table
from lily_deploy.core.errors import LilyDeployError
from lily_deploy.core.fileio import atomic_dir, atomic_file, check_not_input, write_json


def _fails(args, *needles, code=1):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error:"), result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result


def _copy_with_config(adapter, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(edit(cfg)))
    return bad


# ---- one schema check per kind of file -----------------------------------------------------------

@pytest.mark.parametrize("edit, needles", [
    (lambda c: [c], ("adapter_config.json", "expected a JSON object")),
    (lambda c: {k: v for k, v in c.items() if k != "r"}, ("adapter_config.json", "'r' is missing")),
    (lambda c: {**c, "r": "8"}, ("adapter_config.json", "'r' must be an integer")),
    (lambda c: {**c, "num_B": 0}, ("adapter_config.json", "'num_B' must be >= 1")),
])
def test_malformed_adapter_config_is_one_line(minilm_adapter, tmp_path, edit, needles):
    bad = _copy_with_config(minilm_adapter, tmp_path, edit)
    before = (bad / "adapter_config.json").read_bytes()
    _fails(["inspect", str(bad)], *needles)
    assert (bad / "adapter_config.json").read_bytes() == before


def test_broken_sidecar_is_one_line(minilm_adapter, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(minilm_adapter, bad)
    (bad / "lily_deploy.json").write_text("{not json")
    _fails(["inspect", str(bad)], "lily_deploy.json", "not a valid JSON")
    (bad / "lily_deploy.json").write_text(json.dumps({"routing": "zigzag"}))
    _fails(["inspect", str(bad)], "lily_deploy.json", "unknown routing mode 'zigzag'")


def _checkpoint(minilm_adapter, tmp_path):
    from lily_deploy.core.deploy import load_model, save_deploy

    return save_deploy(load_model(minilm_adapter), tmp_path / "ckpt")


def test_deploy_config_with_missing_keys_or_unknown_layers(minilm_adapter, tmp_path):
    ckpt = _checkpoint(minilm_adapter, tmp_path)
    path = ckpt / "deploy_config.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "layers"}))
    _fails(["inspect", str(ckpt)], "deploy_config.json", "'layers' is missing")
    layers = dict(good["layers"])
    name, spec = next(iter(layers.items()))
    layers["bert.encoder.layer.99.attention.self.query"] = spec
    path.write_text(json.dumps({**good, "layers": layers}))
    _fails(["inspect", str(ckpt)], "deploy_config.json", "layer bert.encoder.layer.99.attention.self.query",
           "not in the base")
    broken = {**good, "layers": {name: {k: v for k, v in spec.items() if k != "lp"}}}
    path.write_text(json.dumps(broken))
    _fails(["inspect", str(ckpt)], "deploy_config.json", f"layers {name!r}", "'lp' is missing")


def test_build_report_schema(tmp_path):
    from lily_deploy.runtime.tensorrt import read_report

    engine = tmp_path / "m.plan"
    engine.write_bytes(b"x")
    (tmp_path / "m.plan.json").write_text(json.dumps({"inputs": [{"dtype": "int64"}]}))
    with pytest.raises(LilyDeployError, match=r"m.plan.json: inputs\[0\]: field 'name' is missing"):
        read_report(engine)
    (tmp_path / "m.plan.json").write_text("[]")
    with pytest.raises(LilyDeployError, match="expected a JSON object"):
        read_report(engine)


def test_untrusted_pickle_base_is_refused_with_the_safe_advice(tmp_path):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    base = tmp_path / "base"
    model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, vocab_size=100))
    model.save_pretrained(str(base))
    for f in base.glob("*.safetensors"):
        f.unlink()
    payload = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(payload), "w"))

    torch.save({**model.state_dict(), "evil": Evil()}, base / "pytorch_model.bin")
    result = _fails(["export", str(base), "-o", str(tmp_path / "m.onnx")], "pytorch_model.bin", "untrusted",
                    "safetensors")
    assert "weights_only=False" not in result.output
    assert not payload.exists()


# ---- the top-level handler: OS errors and Ctrl-C --------------------------------------------------

def _patch_inspect(monkeypatch, exc):
    import lily_deploy.inspection as inspection

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(inspection, "describe", boom)


@pytest.mark.parametrize("code, word", [(errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only"),
                                        (errno.EACCES, "Permission denied")])
def test_os_errors_are_one_line(monkeypatch, minilm_adapter, code, word):
    _patch_inspect(monkeypatch, OSError(code, os.strerror(code), "/out/model.onnx"))
    _fails(["inspect", str(minilm_adapter)], "/out/model.onnx", word)


def test_ctrl_c_is_exit_130_even_inside_a_lazy_import(monkeypatch, minilm_adapter):
    _patch_inspect(monkeypatch, KeyboardInterrupt())
    result = CliRunner().invoke(cli, ["inspect", str(minilm_adapter)])
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output
    try:
        try:
            raise KeyboardInterrupt()
        except KeyboardInterrupt as ki:
            raise ImportError("initialization failed") from ki
    except ImportError as exc:
        wrapped = exc
    _patch_inspect(monkeypatch, wrapped)
    result = CliRunner().invoke(cli, ["inspect", str(minilm_adapter)])
    assert result.exit_code == 130 and "interrupted" in result.output


# ---- outputs: ordinary permissions, never an input --------------------------------------------------

def test_outputs_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        with atomic_file(tmp_path / "e.plan") as tmp:
            tmp.write_bytes(b"engine")
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "w").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "e.plan").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755


def test_check_not_input(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"m")
    (tmp_path / "model.onnx.data").write_bytes(b"d")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"w")
    for out, needle in [(model, "is the input"), (tmp_path / "model.onnx.data", "model.onnx.data"),
                        (folder / "adapter_model.safetensors", "lies inside"), (folder, "is the input"),
                        (tmp_path / "." / "model.onnx", "is the input")]:
        with pytest.raises(LilyDeployError, match=needle):
            check_not_input(out, {"ONNX model": model, "adapter": folder})
    link = tmp_path / "alias.onnx"
    link.symlink_to(model)
    with pytest.raises(LilyDeployError, match="is the input"):
        check_not_input(link, {"ONNX model": model})
    check_not_input(tmp_path / "other.onnx", {"ONNX model": model, "adapter": folder, "absent": None})


# ---- property-based: readers, schema checks and flag parsers never raise anything else ----------------

_texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                            lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                      max_size=4), max_leaves=12)
_fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fast
@given(body=_texts, suffix=st.sampled_from([".tsv", ".csv", ".jsonl", ".txt", ".json", ".xyz"]))
def test_text_readers_end_in_rows_or_a_user_error(tmp_path, body, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(body, encoding="utf-8")
    try:
        table = read_text_table(path)
    except LilyDeployError:
        return
    assert len(table.texts) >= 1


@_fast
@given(raw=st.binary(max_size=300))
def test_readers_refuse_random_bytes_cleanly(tmp_path, raw):
    for suffix in (".tsv", ".jsonl"):
        path = tmp_path / f"bytes{suffix}"
        path.write_bytes(raw)
        try:
            read_text_table(path)
        except LilyDeployError:
            pass


@_fast
@given(obj=_json_values)
def test_schema_checks_end_in_an_object_or_a_user_error(obj):
    for sch in (schema.ADAPTER_CONFIG, schema.SIDECAR, schema.DEPLOY_CONFIG, schema.BUILD_REPORT):
        try:
            assert schema.check(obj, sch, "f.json") is obj
        except LilyDeployError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("f.json")


@_fast
@given(obj=_json_values, mutation=st.sampled_from(["r", "num_B", "peft_type", "stride_A", "scaling"]))
def test_mutated_adapter_configs(obj, mutation):
    good = {"peft_type": "LILY", "r": 8, "num_B": 3, "stride_A": 2, "scaling": 0.5, "target_modules": ["query"]}
    try:
        schema.check({**good, mutation: obj}, schema.ADAPTER_CONFIG, "adapter_config.json")
    except LilyDeployError:
        pass


@_fast
@given(text=st.text(max_size=40))
def test_flag_parsers_end_in_a_value_or_a_usage_error(text):
    from lily_deploy.commands.options import int_list, parse_tolerances

    for parse in (lambda: parse_tolerances([text], "--atol"), lambda: int_list(None, None, text)):
        try:
            parse()
        except click.BadParameter:
            pass


def _first_layer(cfg):
    return next(iter(cfg["layers"]))


@pytest.mark.parametrize("edit, needles", [
    (lambda c: {**c, "layers": {**c["layers"], _first_layer(c): {**c["layers"][_first_layer(c)], "mode": "static",
                                                                 "static_p": None}}}, ("is static but has no static_p",)),
    (lambda c: {**c, "layers": {**c["layers"], _first_layer(c): {**c["layers"][_first_layer(c)], "mode": "static",
                                                                 "static_p": [1.0]}}}, ("static_p of 1 entries",)),
    (lambda c: {**c, "folded": {"bert.encoder.layer.77.output.dense": [0.5, 0.5]}}, ("folded layer", "layer.77")),
    (lambda c: {**c, "labels": ["a", "b", "c"]}, ("3 labels for a 2-way classification head",)),
])
def test_inconsistent_checkpoint_configs_are_one_line(minilm_adapter, tmp_path, edit, needles):
    ckpt = _checkpoint(minilm_adapter, tmp_path)
    _edit = json.loads((ckpt / "deploy_config.json").read_text())
    (ckpt / "deploy_config.json").write_text(json.dumps(edit(_edit)))
    _fails(["inspect", str(ckpt)], "deploy_config.json", *needles)


def test_checkpoint_without_its_config_json(minilm_adapter, tmp_path):
    ckpt = _checkpoint(minilm_adapter, tmp_path)
    (ckpt / "config.json").unlink()
    _fails(["export", str(ckpt), "-o", str(tmp_path / "m.onnx")], "cannot read the base architecture")
