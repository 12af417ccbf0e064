"""Shared fixtures: small real models with Lily adapters, made once per test session.

* the packaged MiniLM (real pretrained weights) with a random-but-nonzero Lily adapter;
* a tiny random ViT (image classification) with Lily on k_proj, v_proj;
* a tiny random RoBERTa (biased projections) with Lily on query, value.
"""
from __future__ import annotations

import os
from pathlib import Path

# OpenMP threads that spin-wait slow torch down by orders of magnitude when onnxruntime (or
# anything else) shares the cores; must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two cores shared by the test run: one thread keeps torch fast and results unchanged."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def data_file(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test (a user's machine need not have it)."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is not here (it lives in ../shared/data beside the project)")
    return path


def build_rtx_engine(onnx_path: Path, engine: Path) -> dict:
    """Build ``onnx_path`` with TensorRT for RTX for sm89 through the project's builder (skip if absent)."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed (pip install tensorrt-rtx-cu12)")
    from lily_deploy.trt_build import build_engine

    report = build_engine(onnx_path=onnx_path, output=engine, backend="tensorrt-rtx", compute_capabilities=["sm89"], progress=False)
    assert engine.is_file() and report["engine"]["bytes"] > 1_000_000
    return report.data


def make_lily_adapter(base: str, out: Path, targets, num_labels=None, task_type="SEQ_CLS", r=8, num_b=3,
                      stride=2, scale=0.5, seed=0) -> Path:
    """Save a PEFT-Lily adapter with random non-zero HPs (as after training) onto ``base``."""
    from lily_deploy.core.adapters import random_lily_adapter

    task = {"SEQ_CLS": "seq-cls", None: "image-cls"}[task_type]
    return random_lily_adapter(base, out, targets, num_labels=num_labels, task=task, rank=r, num_hp=num_b,
                               lp_stride=stride, scale=scale, seed=seed)


@pytest.fixture(scope="session")
def minilm_adapter(tmp_path_factory) -> Path:
    return make_lily_adapter("minilm", tmp_path_factory.mktemp("minilm") / "adapter", ["query", "value"], num_labels=2,
                             scale=2.0)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=3)
    out = tmp_path_factory.mktemp("vit") / "base"
    ViTForImageClassification(cfg).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_vit_adapter(tiny_vit_dir, tmp_path_factory) -> Path:
    return make_lily_adapter(str(tiny_vit_dir), tmp_path_factory.mktemp("vit") / "adapter", ["k_proj", "v_proj"],
                             num_labels=3, task_type=None, stride=1, num_b=2)


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory) -> Path:
    """A tiny random RoBERTa (q/k/v with biases) with the MiniLM tokenizer beside it."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    from lily_deploy.core.models import minilm_path

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=0, max_position_embeddings=258, num_labels=2,
                        type_vocab_size=2)
    out = tmp_path_factory.mktemp("roberta") / "base"
    RobertaForSequenceClassification(cfg).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_roberta_adapter(tiny_roberta_dir, tmp_path_factory) -> Path:
    return make_lily_adapter(str(tiny_roberta_dir), tmp_path_factory.mktemp("roberta") / "adapter",
                             ["query", "value"], num_labels=2, num_b=4, stride=2, scale=1.0)


SENTENCES = [
    "a gripping, beautifully acted film",
    "dull",
    "the plot never quite comes together , and the jokes fall flat more often than not",
    "an instant classic",
    "i wanted to like it",
]


# ---- tiny random decoders (real HF architectures) with random-but-nonzero Lily adapters -------------

def _save_decoder(kind: str, out: Path) -> Path:
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    from lily_deploy.core.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                  eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "mistral":  # sliding-window attention
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=64))
    else:  # Qwen2: biased q/k/v, grouped-query attention
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return _save_decoder("llama", tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    return _save_decoder("mistral", tmp_path_factory.mktemp("mistral") / "base")


@pytest.fixture(scope="session")
def mistral_adapter(tiny_mistral_dir, tmp_path_factory) -> Path:
    return decoder_adapter(tiny_mistral_dir, tmp_path_factory.mktemp("mistral") / "adapter")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return _save_decoder("qwen2", tmp_path_factory.mktemp("qwen2") / "base")


def decoder_adapter(base: Path, out: Path, routing: str = "prompt", seed: int = 0) -> Path:
    """A random non-zero Lily adapter on q/v/down projections, its sidecar saying it was trained with ``routing``."""
    import json

    from lily_deploy.core.adapters import SIDECAR, random_lily_adapter

    path = random_lily_adapter(str(base), out, ["q_proj", "v_proj", "down_proj"], task="causal-lm", rank=4,
                               num_hp=3, lp_stride=2, scale=2.0, seed=seed)
    (path / SIDECAR).write_text(json.dumps({"task": "causal-lm", "routing": routing}))
    return path


@pytest.fixture(scope="session")
def llama_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    return decoder_adapter(tiny_llama_dir, tmp_path_factory.mktemp("llama") / "adapter")


@pytest.fixture(scope="session")
def qwen2_adapter(tiny_qwen2_dir, tmp_path_factory) -> Path:
    return decoder_adapter(tiny_qwen2_dir, tmp_path_factory.mktemp("qwen2") / "adapter")
