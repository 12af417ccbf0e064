#!/usr/bin/env python3
"""Run a table of bad inputs and faults through the real CLI and say how each one ended.

    .venv/bin/python scripts/bad_inputs.py [--out out/bad_inputs] [--only SUBSTRING]

Each case runs ``lily-deploy`` in a fresh process on files it makes (a real MiniLM Lily
adapter, its ONNX export, data files, damaged copies). Per case it prints the exit status,
whether a traceback appeared, whether any input changed (sha256 before/after), and whether a
partial or unwanted output was left behind. A case passes when it exits with its expected
status (1 for a bad file or value, 2 for usage), shows no traceback, changes no input and
leaves nothing behind. The last line is the summary the README quotes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "lily_deploy.cli"]


@dataclass
class Case:
    name: str
    args: Callable[[Path], list]  # work folder -> CLI arguments
    expect: tuple = (1,)
    setup: Callable[[Path], None] = lambda w: None
    outputs: Callable[[Path], list] = lambda w: []  # paths that must not exist afterwards
    env: dict = field(default_factory=dict)


def _sha(path: Path) -> dict:
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def make_fixtures(base: Path) -> None:
    """A MiniLM Lily adapter, its ONNX export, a deploy checkpoint and small data files (once)."""
    if (base / "ready").exists():
        return
    from lily_deploy.core.adapters import random_lily_adapter
    from lily_deploy.core.deploy import load_model, save_deploy
    from lily_deploy.onnx_export import export_onnx

    base.mkdir(parents=True, exist_ok=True)
    adapter = random_lily_adapter("minilm", base / "adapter", ["query", "value"], num_labels=2, task="seq-cls",
                                  rank=8, num_hp=3, lp_stride=2, scale=2.0, seed=0)
    export_onnx(source=adapter, output=base / "model.onnx")
    save_deploy(load_model(adapter), base / "ckpt")
    rows = ["sentence\tlabel"] + [f"a {w} film\t{i % 2}" for i, w in enumerate(
        ["fine", "dull", "great", "bad", "lovely", "awful", "neat", "poor"] * 8)]
    _write(base / "data.tsv", "\n".join(rows) + "\n")
    (base / "ready").write_text("ok")


def cases() -> list[Case]:
    A, M, C, D = "adapter", "model.onnx", "ckpt", "data.tsv"
    c: list[Case] = []

    def add(name, args, expect=(1,), setup=lambda w: None, outputs=lambda w: []):
        c.append(Case(name, args, expect, setup, outputs))

    # -- outputs that are inputs (data loss) --
    add("build-trt -o the input ONNX", lambda w: ["build-trt", w / M, "-o", w / M])
    add("build-trt -o the input's .data", lambda w: ["build-trt", w / M, "-o", w / "model.onnx.data"],
        setup=lambda w: (w / "model.onnx.data").write_bytes(b"d"))
    add("export -o a file inside the adapter", lambda w: ["export", w / A, "-o", w / A / "adapter_model.safetensors"])
    add("export -o the adapter folder", lambda w: ["export", w / A, "-o", w / A], expect=(1, 2))
    add("quantize -o the input", lambda w: ["quantize", w / M, "--fp16", "--val", w / D, "-o", w / M])
    add("fold -o the adapter folder", lambda w: ["fold", w / A, "--random-inputs", "-o", w / A])
    add("fold -o inside the adapter", lambda w: ["fold", w / A, "--random-inputs", "-o", w / A / "ckpt"],
        outputs=lambda w: [w / A / "ckpt"])
    add("quickstart -o the training file", lambda w: ["quickstart", "--train", w / D, "--val", w / D, "-o", w / D],
        expect=(1, 2))
    # -- verdicts without evidence --
    add("parity with only a random-bytes .plan", lambda w: ["parity", "--reference", w / A, "--candidate", w / "x.plan",
                                                            "--data", w / D],
        setup=lambda w: (w / "x.plan").write_bytes(os.urandom(4096)))
    add("bench a random-bytes .plan", lambda w: ["bench", w / "x.plan"],
        setup=lambda w: (w / "x.plan").write_bytes(os.urandom(4096)))
    add("bench a random-bytes .onnx", lambda w: ["bench", w / "junk.onnx"],
        setup=lambda w: (w / "junk.onnx").write_bytes(os.urandom(2048)))
    # -- malformed JSON of every kind --
    for label, edit in [("a list", lambda cfg: [cfg]), ("without r", lambda cfg: {k: v for k, v in cfg.items()
                                                                                 if k != "r"}),
                        ("with r as a string", lambda cfg: {**cfg, "r": "8"}), ("with num_B 0", lambda cfg: {**cfg,
                                                                                                      "num_B": 0})]:
        add(f"adapter_config.json {label}", lambda w: ["inspect", w / A],
            setup=lambda w, e=edit: _edit_json(w / A / "adapter_config.json", e))
    add("adapter_config.json not JSON", lambda w: ["inspect", w / A],
        setup=lambda w: _write(w / A / "adapter_config.json", "{"))
    add("lily_deploy.json broken", lambda w: ["inspect", w / A], setup=lambda w: _write(w / A / "lily_deploy.json", "[1,"))
    add("lily_deploy.json bad routing", lambda w: ["export", w / A, "-o", w / "o.onnx"],
        setup=lambda w: _write(w / A / "lily_deploy.json", json.dumps({"routing": "zigzag"})),
        outputs=lambda w: [w / "o.onnx"])
    add("deploy config without layers", lambda w: ["inspect", w / C],
        setup=lambda w: _edit_json(w / C / "deploy_config.json", lambda d: {k: v for k, v in d.items() if k != "layers"}))
    add("deploy config with an unknown layer", lambda w: ["export", w / C, "-o", w / "o.onnx"],
        setup=lambda w: _edit_json(w / C / "deploy_config.json", lambda d: {**d, "layers": {
            **d["layers"], "bert.encoder.layer.42.attention.self.query": next(iter(d["layers"].values()))}}),
        outputs=lambda w: [w / "o.onnx"])
    add("deploy config as a string", lambda w: ["inspect", w / C],
        setup=lambda w: _write(w / C / "deploy_config.json", '"hello"'))
    add("build report not JSON", lambda w: ["parity", "--reference", w / A, "--candidate", w / "e.plan",
                                            "--data", w / D],
        setup=lambda w: ((w / "e.plan").write_bytes(b"x" * 64), _write(w / "e.plan.json", "{")))
    # -- damaged weights --
    add("truncated adapter weights", lambda w: ["inspect", w / A],
        setup=lambda w: (w / A / "adapter_model.safetensors").write_bytes(
            (w / A / "adapter_model.safetensors").read_bytes()[:-500]))
    add("adapter weights of random bytes", lambda w: ["inspect", w / A],
        setup=lambda w: (w / A / "adapter_model.safetensors").write_bytes(os.urandom(1000)))
    add("checkpoint weights missing", lambda w: ["inspect", w / C],
        setup=lambda w: (w / C / "model.safetensors").unlink())
    # -- data files --
    for label, text, suffix in [("JSONL line that is a list", '["a", 1]\n', ".jsonl"),
                                ("JSONL line that is a number", '{"text": "a", "label": 1}\n7\n', ".jsonl"),
                                ("JSONL that is not JSON", "{nope\n", ".jsonl"),
                                ("TSV with no text column", "foo\tbar\n1\t2\n", ".tsv"),
                                ("CSV field over the csv limit", "text,label\n\"" + "x" * 200_000 + "\",1\n", ".csv"),
                                ("empty TSV", "", ".tsv"), ("TSV header only", "sentence\tlabel\n", ".tsv"),
                                ("TSV with an empty label", "sentence\tlabel\nfine\t\n", ".tsv"),
                                ("unsupported data suffix", "x", ".parquet")]:
        name = f"bad{suffix}"
        add(f"inspect --data: {label}", lambda w, n=name: ["inspect", w / A, "--data", w / n],
            setup=lambda w, n=name, t=text: _write(w / n, t))
        add(f"quantize --val: {label}", lambda w, n=name: ["quantize", w / M, "--fp16", "--val", w / n,
                                                            "-o", w / "q.onnx"],
            setup=lambda w, n=name, t=text: _write(w / n, t), outputs=lambda w: [w / "q.onnx"])
    add("data that is not UTF-8", lambda w: ["inspect", w / A, "--data", w / "latin.tsv"],
        setup=lambda w: (w / "latin.tsv").write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1")))
    add("labels the model does not know", lambda w: ["parity", "--reference", w / A, "--candidate", w / M,
                                                     "--data", w / "l.tsv"],
        setup=lambda w: _write(w / "l.tsv", "sentence\tlabel\nfine\tbanana\n"))
    # -- --inputs npz --
    def npz(w, ids):
        import numpy as np

        np.savez(w / "in.npz", input_ids=np.asarray(ids, dtype=np.int64),
                 attention_mask=np.ones_like(np.asarray(ids)), token_type_ids=np.zeros_like(np.asarray(ids)))
    add("--inputs token ids beyond the vocabulary", lambda w: ["export", w / A, "-o", w / "o.onnx", "--inputs",
                                                              w / "in.npz"],
        setup=lambda w: npz(w, [[101, 999999, 102]]), outputs=lambda w: [w / "o.onnx"])
    add("--inputs negative token ids", lambda w: ["export", w / A, "-o", w / "o.onnx", "--inputs", w / "in.npz"],
        setup=lambda w: npz(w, [[101, -5, 102]]), outputs=lambda w: [w / "o.onnx"])
    add("--inputs not an npz", lambda w: ["export", w / A, "-o", w / "o.onnx", "--inputs", w / "in.npz"],
        setup=lambda w: (w / "in.npz").write_bytes(b"PK nope"), outputs=lambda w: [w / "o.onnx"])
    # -- ONNX files --
    add("quantize a random-bytes ONNX", lambda w: ["quantize", w / "junk.onnx", "--fp16", "--val", w / D,
                                                   "-o", w / "q.onnx"],
        setup=lambda w: (w / "junk.onnx").write_bytes(os.urandom(2048)), outputs=lambda w: [w / "q.onnx"])
    add("build-trt a random-bytes ONNX", lambda w: ["build-trt", w / "junk.onnx", "-o", w / "e.plan"],
        setup=lambda w: (w / "junk.onnx").write_bytes(os.urandom(2048)), outputs=lambda w: [w / "e.plan"])
    add("parity candidate: random-bytes ONNX", lambda w: ["parity", "--reference", w / A, "--candidate", w / "junk.onnx",
                                                         "--data", w / D],
        setup=lambda w: (w / "junk.onnx").write_bytes(os.urandom(2048)))
    add("quantize an ONNX whose .data is missing", lambda w: ["quantize", w / "ext.onnx", "--fp16", "--val", w / D,
                                                              "-o", w / "q.onnx"],
        setup=lambda w: _external_without_data(w), outputs=lambda w: [w / "q.onnx"])
    # -- flag values (usage errors: exit 2) --
    for args, label in [
        (lambda w: ["finetune", "--model", "minilm", "--train", w / D, "--val", w / D, "-o", w / "ft", "--rank", "0"],
         "finetune --rank 0"),
        (lambda w: ["finetune", "--model", "minilm", "--train", w / D, "--val", w / D, "-o", w / "ft", "--lr", "nan"],
         "finetune --lr nan"),
        (lambda w: ["finetune", "--model", "minilm", "--train", w / D, "--val", w / D, "-o", w / "ft",
                    "--batch-size", "-3"], "finetune --batch-size -3"),
        (lambda w: ["quantize", w / M, "--int8", "--calib", w / D, "--max-accuracy-drop", "nan", "-o", w / "q.onnx"],
         "quantize --max-accuracy-drop nan"),
        (lambda w: ["quantize", w / M, "--int8", "--calib", w / D, "--calib-size", "0", "-o", w / "q.onnx"],
         "quantize --calib-size 0"),
        (lambda w: ["build-trt", w / M, "-o", w / "e.plan", "--workspace", "1KiB"], "build-trt --workspace 1KiB"),
        (lambda w: ["build-trt", w / M, "-o", w / "e.plan", "--workspace", "lots"], "build-trt --workspace lots"),
        (lambda w: ["build-trt", w / M, "-o", w / "e.plan", "--shapes", "input_ids:axb"], "build-trt --shapes garbage"),
        (lambda w: ["build-trt", w / M, "-o", w / "e.plan", "--compute-capability", "sm1"],
         "build-trt --compute-capability sm1"),
        (lambda w: ["export", w / A, "-o", w / "o.onnx", "--routing", "zigzag"], "export --routing zigzag"),
        (lambda w: ["export", w / A, "-o", w / "o.onnx", "--opset", "9"], "export --opset 9"),
        (lambda w: ["export", w / A, "-o", w / "o.onnx", "--atol", "logits:-1"], "export --atol negative"),
        (lambda w: ["parity", "--reference", w / A, "--candidate", w / M, "--batch-sizes", "0"], "parity --batch-sizes 0"),
        (lambda w: ["parity", "--reference", w / A, "--candidate", w / M, "--atol", "x:y"], "parity --atol x:y"),
        (lambda w: ["bench", w / M, "--iters", "0"], "bench --iters 0"),
        (lambda w: ["bench", w / M, "--seq-lens", "a,b"], "bench --seq-lens a,b"),
        (lambda w: ["fold", w / A, "--random-inputs", "-o", w / "f", "--max-metric-drop", "nan"],
         "fold --max-metric-drop nan"),
        (lambda w: ["fold", w / A, "--random-inputs", "-o", w / "f", "--calib-size", "0"], "fold --calib-size 0"),
        (lambda w: ["quickstart", "-o", w / "qs", "--steps", "0"], "quickstart --steps 0"),
        (lambda w: ["inspect", w / A, "--size", "-1", "--data", w / D], "inspect --size -1"),
        (lambda w: ["no-such-command"], "unknown command"),
    ]:
        add(label, args, expect=(2,), outputs=lambda w: [w / "ft", w / "q.onnx", w / "e.plan", w / "o.onnx", w / "f",
                                                         w / "qs"])
    # -- missing things --
    add("inspect a folder that does not exist", lambda w: ["inspect", w / "nope"])
    add("export to a folder that does not exist", lambda w: ["export", w / A, "-o", w / "no" / "m.onnx"])
    add("finetune with a base that does not exist", lambda w: ["finetune", "--model", w / "nope", "--train", w / D,
                                                               "--val", w / D, "-o", w / "ft"],
        outputs=lambda w: [w / "ft"])
    add("parity with a reference that does not exist", lambda w: ["parity", "--reference", w / "nope",
                                                                  "--candidate", w / M])
    return c


def _external_without_data(w: Path) -> None:
    import onnx

    model = onnx.load(str(w / "model.onnx"))
    onnx.save_model(model, str(w / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    (w / "ext.onnx.data").unlink()


def run_case(case: Case, fixtures: Path, work: Path) -> dict:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(fixtures, work, symlinks=True)
    case.setup(work)
    before = _sha(work)
    args = [str(a) for a in case.args(work)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", **case.env)
    started = time.perf_counter()
    proc = subprocess.run(EXE + args, capture_output=True, text=True, cwd=work, env=env, timeout=600)
    after = _sha(work)
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    removed = sorted(k for k in before if k not in after)
    partial = sorted(k for k in after if k not in before and (".partial" in k or ".old" in k))
    leftover = [str(p.relative_to(work)) for p in case.outputs(work) if p.exists()]
    text = proc.stdout + proc.stderr
    last = next((l for l in reversed(text.strip().splitlines()) if l.strip()), "")
    ok = (proc.returncode in case.expect and "Traceback" not in text and not changed and not removed
          and not partial and not leftover)
    return {"case": case.name, "exit": proc.returncode, "expected": list(case.expect), "traceback": "Traceback" in text,
            "inputs_changed": changed + removed, "partial_files": partial + leftover, "ok": ok,
            "message": last[:160], "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/bad_inputs", help="work folder and report (bad_inputs.json)")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    fixtures = out / "fixtures"
    print("making fixtures (MiniLM Lily adapter, ONNX export, checkpoint, data) ...", flush=True)
    make_fixtures(fixtures)
    todo = [c for c in cases() if not args.only or args.only in c.name]
    rows = []
    for i, case in enumerate(todo, 1):
        row = run_case(case, fixtures, out / "work")
        rows.append(row)
        flag = "ok  " if row["ok"] else "FAIL"
        print(f"{flag} {i:3d}/{len(todo)} exit {row['exit']} (want {'/'.join(map(str, row['expected']))})"
              f"{' TRACEBACK' if row['traceback'] else ''}"
              f"{' CHANGED ' + ','.join(row['inputs_changed']) if row['inputs_changed'] else ''}"
              f"{' LEFT ' + ','.join(row['partial_files']) if row['partial_files'] else ''}"
              f"  {case.name}: {row['message']}", flush=True)
    shutil.rmtree(out / "work", ignore_errors=True)
    summary = {"cases": len(rows), "ok": sum(r["ok"] for r in rows),
               "tracebacks": sum(r["traceback"] for r in rows),
               "inputs_changed": sum(bool(r["inputs_changed"]) for r in rows),
               "partial_files": sum(bool(r["partial_files"]) for r in rows),
               "wrong_exit": sum(r["exit"] not in r["expected"] for r in rows)}
    (out / "bad_inputs.json").write_text(json.dumps({"summary": summary, "cases": rows}, indent=2) + "\n")
    print(f"{summary['cases']} cases: {summary['ok']} handled, {summary['tracebacks']} tracebacks, "
          f"{summary['inputs_changed']} inputs changed, {summary['partial_files']} partial/unwanted files, "
          f"{summary['wrong_exit']} wrong exit statuses")
    return 0 if summary["ok"] == summary["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
