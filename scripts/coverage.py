"""Coverage of the architectures and tasks users bring: tiny random configs of real Hugging Face models,
each with a random non-zero PEFT Lily adapter, run through inspect -> export -> parity -> quantize
(-> build-trt with TensorRT for RTX when installed), plus ``finetune`` with default flags.

    python scripts/coverage.py                       # every row
    python scripts/coverage.py --only bert,albert    # some rows
    python scripts/coverage.py --json out/coverage.json --no-trt

Prints one table: per architecture and task, each stage's outcome (ok, FAIL, or the one-line refusal
when the case is not supported). Every model is random and tiny (hidden 32, 2 layers), so a row
takes seconds; nothing is downloaded (the tokenizer is the packaged MiniLM's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=512, pad_token_id=0)  # build-trt's default profile reaches 256 tokens
DECODER = dict(TEXT, num_key_value_heads=2, eos_token_id=102, bos_token_id=101)
IMAGE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8, num_channels=3)


@dataclass(frozen=True)
class Case:
    """One row: a model type, the task it is loaded for, its config keywords and the Lily targets (None: defaults)."""

    name: str
    model_type: str
    task: str
    config: dict
    targets: Optional[tuple] = None
    note: str = ""


CASES = [
    Case("bert", "bert", "seq-cls", dict(TEXT, type_vocab_size=2)),
    Case("distilbert", "distilbert", "seq-cls",
         dict(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=512)),
    Case("roberta", "roberta", "seq-cls", dict(TEXT, max_position_embeddings=514, type_vocab_size=1)),
    Case("xlm-roberta", "xlm-roberta", "seq-cls", dict(TEXT, max_position_embeddings=514, type_vocab_size=1)),
    Case("electra", "electra", "seq-cls", dict(TEXT, embedding_size=32, type_vocab_size=2)),
    Case("modernbert", "modernbert", "seq-cls", dict(TEXT, global_attn_every_n_layers=1, local_attention=16)),
    Case("albert", "albert", "seq-cls", dict(TEXT, embedding_size=16, type_vocab_size=2),
         note="one layer's weights shared by every layer"),
    Case("deberta-v2", "deberta-v2", "seq-cls", dict(TEXT, type_vocab_size=0, relative_attention=True,
                                                     position_buckets=8, pos_att_type=["p2c", "c2p"],
                                                     share_att_key=True, norm_rel_ebd="layer_norm"),
         note="adapted layers need two HPMix variants"),
    Case("llama", "llama", "seq-cls", DECODER),
    Case("qwen2", "qwen2", "seq-cls", DECODER),
    Case("mistral", "mistral", "seq-cls", dict(DECODER, sliding_window=64)),
    Case("phi", "phi", "seq-cls", dict(DECODER, partial_rotary_factor=0.5)),
    Case("phi3", "phi3", "seq-cls", dict(DECODER, partial_rotary_factor=1.0)),
    Case("gpt2", "gpt2", "seq-cls", dict(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                                         pad_token_id=0), note="Conv1D attention"),
    Case("bert-token-cls", "bert", "token-cls", dict(TEXT, type_vocab_size=2)),
    Case("bert-qa", "bert", "qa", dict(TEXT, type_vocab_size=2)),
    Case("t5", "t5", "seq2seq", dict(vocab_size=30522, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                     pad_token_id=0, decoder_start_token_id=0, eos_token_id=102)),
    Case("vit", "vit", "image-cls", IMAGE),
    Case("deit", "deit", "image-cls", IMAGE),
    Case("beit", "beit", "image-cls", dict(IMAGE, use_mean_pooling=True)),
    Case("swin", "swin", "image-cls", dict(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                                           num_heads=[2, 2], window_size=4)),
]
CASES_BY_NAME = {c.name: c for c in CASES}
STAGES = ("finetune", "inspect", "export", "parity", "quantize", "build-trt")


def save_tiny_model(case: Case, out: Path, num_labels: int = 3, seed: int = 0) -> Path:
    """A tiny random model of ``case`` saved as a Hugging Face folder (with the MiniLM tokenizer for text)."""
    import torch
    import transformers

    from lily_deploy.core.models import AUTO_CLASSES, minilm_path, quiet_transformers

    quiet_transformers()
    torch.manual_seed(seed)
    kwargs = dict(case.config)
    if case.task in ("seq-cls", "image-cls", "token-cls"):
        kwargs["num_labels"] = num_labels
    config = transformers.AutoConfig.for_model(case.model_type, **kwargs)
    auto = getattr(transformers, AUTO_CLASSES[case.task])
    cls = {"deit": transformers.DeiTForImageClassification}.get(case.model_type) if case.task == "image-cls" else None
    model = (cls or auto)._from_config(config) if cls else auto.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    if case.task != "image-cls":
        transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(str(out))
    return out


def default_targets_of(model_dir: Path, task: str) -> list[str]:
    """The targets ``finetune`` would choose for this model (its defaults), without training."""
    from lily_deploy.core.models import load_base, new_modules
    from lily_deploy.training import head_name, resolve_targets

    base = load_base(str(model_dir), task=task, num_labels=3 if task in ("seq-cls", "image-cls", "token-cls") else None)
    head = head_name(base.model) if task in ("seq-cls", "image-cls", "token-cls") else None
    saved = ([head] if head else []) + new_modules(base.model, base.new_weights)
    return resolve_targets(base.model, None, saved or None, base.spec, decoder=task == "causal-lm")[0]


def write_text_data(out: Path, rows: int = 24, seed: int = 0) -> Path:
    """A labelled TSV of short texts (two labels carried by one word), as every text command takes."""
    import random

    rng = random.Random(seed)
    fill = ["the", "film", "was", "a", "story", "of", "plot", "acting", "and", "it"]
    lines = ["sentence\tlabel"]
    for i in range(rows):
        words = rng.sample(fill, rng.randint(2, 7)) + [("great" if i % 2 else "awful")]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)}\t{i % 2}")
    out.write_text("\n".join(lines) + "\n")
    return out


def write_image_folder(out: Path, size: int = 32, per_label: int = 6, seed: int = 0) -> Path:
    """``out/<label>/<image>.png``: two labels of seeded random PNG images (a real image folder, via Pillow)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, tint in (("0", 0), ("1", 2)):  # integer labels: they match a new head's LABEL_i
        (out / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            pixels = rng.integers(0, 160, (size, size, 3), dtype=np.uint8)
            pixels[..., tint] = 255  # a colour per label
            Image.fromarray(pixels).save(out / label / f"{i}.png")
    return out


@dataclass
class Row:
    """One architecture's outcomes, stage by stage: ok, FAIL (with the line), a refusal, or '-' (not run)."""

    case: Case
    stages: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0


def _cli(args: list[str]) -> tuple[int, str]:
    from click.testing import CliRunner

    from lily_deploy.cli import cli

    result = CliRunner().invoke(cli, args)
    text = result.output or ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += f"\n{type(result.exception).__name__}: {result.exception}"
    return result.exit_code, text


def _last_line(text: str) -> str:
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("Error") or "error" in l.lower()[:12]]
    return (errors or lines or [""])[-1][:240]


def _stage(row: Row, name: str, args: list[str], refusal: Optional[str] = None) -> bool:
    """Run one CLI stage; record ok, the refusal (when ``refusal`` is in its one-line error) or FAIL."""
    code, text = _cli(args)
    if code == 0:
        row.stages[name] = "ok"
        return True
    line = _last_line(text)
    row.stages[name] = "refused" if refusal and refusal in text else "FAIL"
    row.details[name] = line
    return False


def _has_rtx() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_rtx") is not None


def run_case(case: Case, work: Path, stages=STAGES, trt: Optional[bool] = None) -> Row:
    """Every stage of ``stages`` for one case in folder ``work``; a stage whose input failed is '-'."""
    from lily_deploy.core.adapters import random_lily_adapter
    from lily_deploy.core.errors import LilyDeployError

    row, started = Row(case), time.perf_counter()
    row.stages = {s: "-" for s in STAGES}
    model_dir = save_tiny_model(case, work / "base")
    image = case.task == "image-cls"
    data = write_image_folder(work / "images") if image else write_text_data(work / "data.tsv")
    trainable = case.task in ("seq-cls", "image-cls")
    if "finetune" in stages and trainable:
        ft = work / "finetuned"
        if _stage(row, "finetune", ["finetune", "--model", str(model_dir), "--train", str(data), "--val", str(data),
                                    "-o", str(ft), "--max-steps", "2", "--batch-size", "4", "--no-progress"],
                  refusal="Conv1D") and image:  # the image path end to end: finetune -> export -> parity
            ok = _stage(row, "ft-export", ["export", str(ft), "-o", str(work / "ft.onnx")])
            if ok:
                ok = _stage(row, "ft-parity", ["parity", "--reference", str(ft), "--candidate",
                                               str(work / "ft.onnx"), "--data", str(data)])
            row.stages["finetune"] = "ok" if ok else "FAIL"
            row.details.update({k: v for k, v in row.details.items() if k.startswith("ft-")})
    try:
        targets = list(case.targets or default_targets_of(model_dir, case.task))
        adapter = random_lily_adapter(str(model_dir), work / "adapter", targets,
                                      num_labels=3 if case.task != "qa" else None, task=case.task, rank=4,
                                      num_hp=3, lp_stride=2, scale=2.0)
    except LilyDeployError as exc:
        row.stages["inspect"] = "refused"
        row.details["inspect"] = str(exc)[:240]
        row.seconds = time.perf_counter() - started
        return row
    run = lambda name: name in stages  # noqa: E731
    onnx = work / "model.onnx"
    if run("inspect"):
        _stage(row, "inspect", ["inspect", str(adapter), "--json"]
               + ([] if case.task == "seq2seq" else ["--data", str(data)]))
    if run("export") and _stage(row, "export", ["export", str(adapter), "-o", str(onnx)],
                                refusal="not encoder-decoders yet"):
        if run("parity"):
            _stage(row, "parity", ["parity", "--reference", str(adapter), "--candidate", str(onnx), "--data",
                                   str(data)])
        if run("quantize"):
            # the path, not the accuracy: a random tiny model's logits nearly tie, so one flipped row of 24
            # is 4 points; --max-accuracy-drop is for trained models
            _stage(row, "quantize", ["quantize", str(onnx), "-o", str(work / "model.int8.onnx"), "--int8",
                                     "--calib", str(data), "--max-accuracy-drop", "100"])
        if run("build-trt") and (trt if trt is not None else _has_rtx()):
            _stage(row, "build-trt", ["build-trt", str(onnx), "-o", str(work / "model.plan"), "--backend",
                                      "tensorrt-rtx", "--compute-capability", "sm89"])
    row.seconds = time.perf_counter() - started
    return row


def format_table(rows: list[Row]) -> str:
    """One line per case (stage outcomes), then the line each failure or refusal printed."""
    head = f"{'architecture':<16} {'task':<10} " + " ".join(f"{s:<9}" for s in STAGES) + "  seconds"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.case.name:<16} {r.case.task:<10} " + " ".join(f"{r.stages.get(s, '-'):<9}" for s in STAGES)
                     + f"  {r.seconds:6.1f}")
    lines.append("finetune: 2 steps with default flags (targets, heads) on generated data; for image rows on a "
                 "generated PNG folder, then export -> parity of the result. The other stages run a random "
                 "non-zero Lily adapter on the default targets; parity: fp32 onnxruntime vs torch; quantize: INT8 "
                 "Q/DQ written and validated (accuracy gate off: random models' logits nearly tie).")
    notes = [f"  {r.case.name} {stage}: {line}" for r in rows for stage, line in r.details.items()]
    return "\n".join(lines + (["", "failures and refusals:"] + notes if notes else []))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    parser.add_argument("--no-trt", action="store_true", help="skip build-trt even when TensorRT for RTX is here")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    torch.set_num_threads(1)
    names = args.only.split(",") if args.only else [c.name for c in CASES]
    unknown = [n for n in names if n not in CASES_BY_NAME]
    if unknown:
        parser.error(f"unknown case {unknown[0]}; cases: {', '.join(CASES_BY_NAME)}")
    stages = tuple(s for s in args.stages.split(",") if s)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(run_case(CASES_BY_NAME[name], Path(tmp) / name, stages, trt=False if args.no_trt else None))
            print(format_table(rows[-1:]).splitlines()[2], flush=True)  # the row, as it finishes
    print()
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{"name": r.case.name, "task": r.case.task, "stages": r.stages,
                                                "details": r.details, "seconds": round(r.seconds, 1)}
                                               for r in rows], indent=2) + "\n")
    return 1 if any(v == "FAIL" for r in rows for v in r.stages.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
