"""quickstart: the whole pipeline on the embedded default; an interruption resumes cleanly."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lily_deploy.cli import cli
from lily_deploy.core.config import ConfigError
from lily_deploy.core.errors import LilyDeployError
from lily_deploy.datasets import write_reviews
from lily_deploy.pipeline import (QUICKSTART_STAGES, Pipeline, QuickstartConfig, Stage, StageLog, StageSkipped,
                                  quickstart, run_stages)


def test_embedded_data_set_is_seeded_and_disjoint(tmp_path):
    a_train, a_val = write_reviews(tmp_path / "a", n_train=200, n_val=50)
    b_train, _ = write_reviews(tmp_path / "b", n_train=200, n_val=50)
    assert a_train.read_text() == b_train.read_text()
    train = {l.split("\t")[0] for l in a_train.read_text().splitlines()[1:]}
    val = {l.split("\t")[0] for l in a_val.read_text().splitlines()[1:]}
    assert len(train) == 200 and len(val) == 50 and not train & val
    labels = [l.split("\t")[1] for l in a_train.read_text().splitlines()[1:]]
    assert 0.3 < labels.count("positive") / len(labels) < 0.7


def test_embedded_data_set_carries_a_little_label_noise(tmp_path):
    """The same sentences with and without noise; about 8% of the labels flipped, in both splits."""
    noisy = [write_reviews(tmp_path / "n", n_train=1200, n_val=400)]
    clean = [write_reviews(tmp_path / "c", n_train=1200, n_val=400, noise=0.0)]
    for noisy_file, clean_file in zip(noisy[0], clean[0]):
        a = [l.split("\t") for l in noisy_file.read_text().splitlines()[1:]]
        b = [l.split("\t") for l in clean_file.read_text().splitlines()[1:]]
        assert [t for t, _ in a] == [t for t, _ in b]
        flipped = sum(x != y for (_, x), (_, y) in zip(a, b)) / len(a)
        assert 0.04 < flipped < 0.12, flipped
    text = clean[0][0].read_text()
    for construction in (" , but ", "although ", "despite", "not only", "less ", "not without"):
        assert construction in text


@pytest.mark.slow
def test_quickstart_fine_tuning_lands_in_the_honest_band(tmp_path):
    """The quickstart's own fine-tuning (MiniLM, Lily, 250 steps) lands between 85% and 95%, not at 100%."""
    from lily_deploy.training import finetune

    train, val = write_reviews(tmp_path / "data")
    c = QuickstartConfig()
    result = finetune(model="minilm", train=str(train), val=str(val), output=str(tmp_path / "a"), method="lily",
                      rank=c.rank, num_hp=c.num_hp, lp_stride=c.lp_stride, scale=c.scale, max_steps=c.steps,
                      batch_size=c.batch_size, lr=c.lr, routing="sample", max_length=64, progress=False)
    assert 0.85 <= result.best_val_accuracy <= 0.95


def _plain_reviews(folder, n_train=320, n_val=96):
    """One-clause reviews (no negation, no contrast, no noise): 40 steps learn them, so the test is about resuming."""
    import random

    from lily_deploy.datasets import NEGATIVE, POSITIVE, SUBJECTS

    rng = random.Random(1)
    folder.mkdir(parents=True)
    paths = []
    for name, n in (("train.tsv", n_train), ("val.tsv", n_val)):
        rows = []
        for _ in range(n):
            label = rng.randrange(2)
            rows.append(f"{rng.choice(SUBJECTS)} is {rng.choice(POSITIVE if label else NEGATIVE)}\t"
                        f"{('negative', 'positive')[label]}\n")
        (folder / name).write_text("sentence\tlabel\n" + "".join(rows))
        paths.append(folder / name)
    return paths


def test_quickstart_interrupted_then_resumed(tmp_path, monkeypatch):
    import lily_deploy.precision

    out = tmp_path / "qs"
    train, val = _plain_reviews(tmp_path / "plain")
    args = ["quickstart", "-o", str(out), "--steps", "40", "--no-bench", "--train", str(train), "--val", str(val)]

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


@pytest.mark.parametrize("fresh", [False, True])
def test_quickstart_never_writes_over_its_data(tmp_path, fresh):
    out = tmp_path / "qs"
    train, val = write_reviews(out / "mine", n_train=20, n_val=10)
    before = {p: p.read_bytes() for p in (train, val)}
    args = ["quickstart", "-o", str(out), "--train", str(train), "--val", str(val)] + (["--fresh"] if fresh else [])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "input training data" in r.output
    assert {p: p.read_bytes() for p in (train, val)} == before
    assert sorted(p.name for p in out.iterdir()) == ["mine"]  # no stage ran
    with pytest.raises(LilyDeployError, match="is the input training data"):
        quickstart(output=train, train=train, val=val, fresh=fresh)  # the CLI refuses a file for -o itself
    assert {p: p.read_bytes() for p in (train, val)} == before


@pytest.mark.parametrize("args, flag, field", [
    (["--steps", "0"], "--steps", "steps"), (["--batch-size", "0"], "--batch-size", "batch_size"),
    (["--train", "t.tsv"], "--val", "val"), (["--val", "v.tsv"], "--train", "train"),
])
def test_quickstart_config_errors_name_the_flag_and_the_field(tmp_path, args, flag, field):
    r = CliRunner().invoke(cli, ["quickstart", "-o", str(tmp_path / "qs"), *args])
    assert r.exit_code == 2 and f"'{flag}'" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "qs").exists()
    fields = {"steps": {"steps": 0}, "batch_size": {"batch_size": 0}, "val": {"train": "t.tsv"},
              "train": {"val": "v.tsv"}}[field]
    with pytest.raises(ConfigError) as exc:
        quickstart(output=tmp_path / "qs", **fields)
    assert exc.value.field == field and str(exc.value).startswith(f"{field}: ")
    for bad in ({"lr": float("nan")}, {"lr": 0.0}, {"scale": float("inf")}, {"rank": 0}, {"calib_size": 1.5}):
        with pytest.raises(ConfigError) as exc:
            QuickstartConfig(**bad)
        assert exc.value.field == next(iter(bad))
    assert not (tmp_path / "qs").exists()


def test_quickstart_stages_are_declared_once():
    names = [s.name for s in QUICKSTART_STAGES]
    assert names == ["data", "finetune", "fold", "export", "quantize", "build-trt", "parity", "bench"]
    resumable = {s.name for s in QUICKSTART_STAGES if s.artifacts}
    assert resumable == {"data", "finetune", "fold", "export", "quantize", "build-trt"}  # parity/bench: every run


def test_stage_runner_resumes_skips_and_times(tmp_path):
    """One loop does the bookkeeping for every stage: skip, keep what an earlier run finished, time, mark."""
    ran, events = [], []

    def write(name):
        def run(ctx):
            ran.append(name)
            (tmp_path / f"{name}.txt").write_text(name)
            return {"value": len(ran)}
        return run

    def unavailable(ctx):
        raise StageSkipped("skipped: not installed here")

    class Log(StageLog):
        def start(self, stage, kept):
            events.append(("start", stage.name, kept))

        def skipped(self, stage, reason):
            events.append(("skipped", stage.name, reason))

    stages = (Stage("a", write("a"), ("a.txt",), after=lambda ctx: events.append(("after", "a"))),
              Stage("b", write("b"), ("b.txt",), skip=lambda ctx: ctx.get("skip_b")),
              Stage("c", unavailable, ("c.txt",)),
              Stage("d", write("d")))
    first = run_stages(stages, {"skip_b": "off"}, Log(), state=Pipeline(tmp_path))
    assert ran == ["a", "d"] and set(first.timings) == {"a", "d"}
    assert first.skipped == {"b": "off", "c": "skipped: not installed here"}
    state = json.loads((tmp_path / "quickstart_state.json").read_text())
    assert set(state) == {"a"} and state["a"]["done"] and state["a"]["value"] == 1  # d has no artifacts
    assert ("after", "a") in events and ("start", "a", False) in events
    events.clear()
    second = run_stages(stages, {}, Log(), state=Pipeline(tmp_path))
    assert ran == ["a", "d", "b", "d"] and set(second.timings) == {"b", "d"}  # a kept, d runs every time
    assert ("start", "a", True) in events and ("after", "a") in events
    (tmp_path / "a.txt").unlink()  # an artifact gone: the stage runs again
    third = run_stages(stages, {}, state=Pipeline(tmp_path))
    assert ran == ["a", "d", "b", "d", "a", "d"] and set(third.timings) == {"a", "d"}
