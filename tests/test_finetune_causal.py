"""``lily-deploy finetune`` on causal LMs: prompt/response data, decoder routings, deploy parity, bad input.

Tiny random Llama and Qwen2 decoders (Qwen2: biased q/k/v, fewer key/value heads than query
heads) learn SST-2 reviews written as prompts (``Review: ...\\nSentiment:``) with responses
(`` positive`` / `` negative``). Their tokenizer is a BERT WordPiece whose vocabulary is the
words of those rows, so the LM head stays small and the tests fast.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import data_file
from lily_deploy.cli import cli
from lily_deploy.core.config import ConfigError
from lily_deploy.core.errors import LilyDeployError
from lily_deploy.training import DECODER_TARGETS, FinetuneConfig, finetune, route_lily_layers

QUIET = {"progress": False, "log": lambda msg: None}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _sst2_rows(n: int) -> list[tuple[str, str]]:
    """``n`` short SST-2 training rows (3 to 12 words), in a seeded order."""
    path = data_file("sst2", "train.tsv")
    rows = [line.rstrip("\n").split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    rows = [(s.strip(), l) for s, l in (r for r in rows if len(r) == 2) if 3 <= len(s.split()) <= 12]
    random.Random(0).shuffle(rows)
    return rows[:n]


def _prompt(sentence: str) -> str:
    return f"Review: {sentence}\nSentiment:"


def _response(label: str) -> str:
    return " positive" if label == "1" else " negative"


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sst2(tmp_path_factory) -> dict:
    rows = _sst2_rows(208)
    d = tmp_path_factory.mktemp("sst2lm")
    records = [{"prompt": _prompt(s), "response": _response(l)} for s, l in rows]
    return {"rows": rows, "train": write_jsonl(d / "train.jsonl", records[:160]),
            "val": write_jsonl(d / "val.jsonl", records[160:])}


@pytest.fixture(scope="module")
def tokenizer(sst2):
    """A lower-casing WordPiece over the words of the rows; [SEP] doubles as EOS, [PAD] pads."""
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertTokenizer

    pre = BertPreTokenizer()
    words = set()
    for sentence, label in sst2["rows"]:
        for text in (_prompt(sentence), _response(label)):
            words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    vocab = SPECIAL + sorted(words)
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, eos_token="[SEP]")


def _save(model, tokenizer, out: Path) -> Path:
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def llama_dir(tokenizer, tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return _save(LlamaForCausalLM(cfg), tokenizer, tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def qwen_dir(tokenizer, tmp_path_factory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(cfg)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's biased q/k/v
    return _save(model, tokenizer, tmp_path_factory.mktemp("qwen2") / "base")


def _cli(model: Path, train: Path, val: Path, out: Path, *extra: str):
    result = CliRunner().invoke(cli, ["finetune", "--model", str(model), "--train", str(train), "--val", str(val),
                                      "-o", str(out), "--batch-size", "16", "--rank", "4", "--num-hp", "2",
                                      "--no-progress", *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def llama_run(llama_dir, sst2, tmp_path_factory) -> dict:
    """One CLI run with the defaults a causal LM gets: task read from the model, prompt routing, all projections."""
    out = tmp_path_factory.mktemp("llamarun") / "adapter"
    result = _cli(llama_dir, sst2["train"], sst2["val"], out, "--max-steps", "40", "--lr", "0.05",
                  "--eval-every", "20")
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output}


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _log(out) if "loss" in r and "event" not in r]


def _val_batch(tokenizer, rows, n: int) -> dict:
    """Full prompt + response sequences of ``n`` rows, right-padded, with their labels, as training builds them."""
    from lily_deploy.core.data import lm_batch, lm_example, lm_pad_id

    examples = [lm_example(tokenizer, _prompt(s), _response(l), 128) for s, l in rows[:n]]
    assert len({len(ids) for ids, _ in examples}) > 1  # the batch has padding
    return lm_batch(examples, lm_pad_id(tokenizer))


def _peft_with_hooks(adapter: Path, base_dir: Path, mode: str):
    from peft import PeftModel

    from lily_deploy.core.models import load_base

    base = load_base(str(base_dir), task="causal-lm")
    peft_model = PeftModel.from_pretrained(base.model, str(adapter)).eval()
    return peft_model, route_lily_layers(peft_model, mode)


# ------------------------------------------------------------------ learning, the sidecar, deploy parity
def test_llama_learns_the_responses_with_prompt_routing(llama_run):
    out = llama_run["out"]
    losses = _losses(out)
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    evals = [r for r in _log(out) if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [20, 40]
    # chance is one token in the vocabulary; the model has learnt the answer words and the EOS
    assert max(e["val_accuracy"] for e in evals) >= 0.5
    for e in evals:
        assert e["val_tokens"] == 2 * 48 and e["val_size"] == 48  # the response word and EOS of each row
        assert e["val_perplexity"] == pytest.approx(torch.tensor(e["val_loss"]).exp().item(), rel=1e-6)
    sidecar = json.loads((out / "lily_deploy.json").read_text())
    assert sidecar["task"] == "causal-lm" and sidecar["routing"] == "prompt" and sidecar["method"] == "lily"
    assert sidecar.get("labels") is None
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and set(config["target_modules"]) == set(DECODER_TARGETS)
    assert not config.get("modules_to_save")  # no head: the LM head stays the base's
    assert "(causal-lm, routing prompt, 14 layers" in llama_run["output"]
    assert "best val response-token accuracy" in llama_run["output"]


def test_prompt_routing_trains_as_it_deploys(llama_run, llama_dir, tokenizer, sst2):
    """Logits of the training model (PEFT + hooks) and the deploy model agree on full prompt+response sequences."""
    from lily_deploy.core.data import IGNORE_INDEX
    from lily_deploy.core.deploy import load_model

    out = llama_run["out"]
    batch = _val_batch(tokenizer, sst2["rows"][160:], 8)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    prompt = (batch["labels"] == IGNORE_INDEX) & batch["attention_mask"].bool()
    deploy = load_model(out)
    assert deploy.task == "causal-lm" and {layer.mode for layer in deploy.layers.values()} == {"prompt"}
    assert len(deploy.layers) == 14
    peft_model, hooks = _peft_with_hooks(out, llama_dir, "prompt")
    with torch.no_grad():
        deploy.context.prompt_mask = prompt
        deployed = deploy.logits(**inputs)
        hooks.context.prompt_mask = prompt
        trained = peft_model(**inputs).logits
        assert hooks.context.prompt_mask is None and hooks.context.mask is None  # cleared after the forward
        hooks.remove()
        plain = peft_model(**inputs).logits  # PEFT's own batch routing
    real = batch["attention_mask"].bool()
    assert torch.allclose(trained[real], deployed[real], atol=1e-5), (trained - deployed)[real].abs().max()
    assert not torch.allclose(plain[real], deployed[real], atol=1e-4)  # the routing matters for this adapter


def test_saved_adapter_is_the_best_by_response_token_accuracy(llama_run, tokenizer, sst2):
    """Argmax next-token accuracy over the validation responses, recomputed through the deploy model."""
    from lily_deploy.core.data import IGNORE_INDEX
    from lily_deploy.core.deploy import load_model

    out = llama_run["out"]
    deploy = load_model(out)
    right = total = 0
    nll = {"prompt": 0.0, "all tokens": 0.0}
    with torch.no_grad():
        for start in range(0, 48, 16):
            batch = _val_batch(tokenizer, sst2["rows"][160 + start:], 16)
            nexts = batch["labels"][:, 1:]
            keep = nexts != IGNORE_INDEX
            for masks in ("prompt", "all tokens"):
                prompt = (batch["labels"] == IGNORE_INDEX) & batch["attention_mask"].bool()
                deploy.context.prompt_mask = prompt if masks == "prompt" else None
                logits = deploy.logits(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[:, :-1]
                nll[masks] += torch.nn.functional.cross_entropy(logits[keep], nexts[keep], reduction="sum").item()
                if masks == "prompt":
                    right += (logits.argmax(-1)[keep] == nexts[keep]).sum().item()
                    total += keep.sum().item()
    best = json.loads((out / "lily_deploy.json").read_text())["best"]
    assert total == 96 and right / total == pytest.approx(best["val_accuracy"])
    # training evaluated with the prompt mask, not with every token as prompt
    assert abs(nll["prompt"] / total - best["val_loss"]) < 1e-6
    assert abs(nll["all tokens"] / total - best["val_loss"]) > 1e-5  # 100x float rounding: the mask matters


def test_qwen2_causal_routing_trains_as_it_deploys(qwen_dir, tokenizer, sst2, tmp_path):
    from lily_deploy.core.deploy import load_model

    out = tmp_path / "qwen"
    result = finetune(model=str(qwen_dir), train=sst2["train"], val=sst2["val"], output=out, routing="causal",
                      max_steps=30, batch_size=16, rank=4, num_hp=2, lr=0.05, eval_every=30, **QUIET)
    assert result.task == "causal-lm" and result.best_val_accuracy >= 0.5
    losses = _losses(out)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert json.loads((out / "lily_deploy.json").read_text())["routing"] == "causal"
    batch = _val_batch(tokenizer, sst2["rows"][160:], 8)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    deploy = load_model(out)
    assert {layer.mode for layer in deploy.layers.values()} == {"causal"}
    peft_model, _ = _peft_with_hooks(out, qwen_dir, "causal")
    with torch.no_grad():
        deployed, trained = deploy.logits(**inputs), peft_model(**inputs).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(trained[real], deployed[real], atol=1e-5), (trained - deployed)[real].abs().max()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_two_processes_match_one_for_prompt_routing(llama_dir, sst2, tmp_path):
    """The loss is the mean over the global step's response tokens, whichever rank holds them.

    Responses of 1 to 5 words (echoing the review), so ranks hold different token counts.
    """
    from safetensors.torch import load_file

    from test_finetune import _torchrun

    records = [{"prompt": _prompt(s), "response": _response(l) + "".join(" " + w for w in s.split()[:i % 5])}
               for i, (s, l) in enumerate(sst2["rows"][:64])]
    train = write_jsonl(tmp_path / "varied.jsonl", records)
    common = ["finetune", "--model", str(llama_dir), "--train", str(train), "--val", str(sst2["val"]),
              "--max-steps", "4", "--batch-size", "16", "--grad-accum", "2", "--rank", "4", "--num-hp", "2",
              "--lr", "0.05", "--eval-every", "2", "--no-progress", "--device", "cpu"]
    proc = _torchrun(common + ["-o", str(tmp_path / "ddp")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "DDP: 2 processes (gloo), routing prompt: batch-invariant" in proc.stderr
    single = CliRunner().invoke(cli, common + ["-o", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    ddp, one = (load_file(str(tmp_path / run / "checkpoints" / "last" / "trainable.safetensors"))
                for run in ("ddp", "one"))
    assert ddp.keys() == one.keys() and max((ddp[k] - one[k]).abs().max().item() for k in ddp) < 1e-5
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
    evals = [[r["val_loss"] for r in _log(tmp_path / run) if r.get("event") == "eval"] for run in ("ddp", "one")]
    assert evals[0] == pytest.approx(evals[1], abs=1e-5)


def test_lora_baseline_runs_through_the_same_loop(llama_dir, sst2, tmp_path):
    result = finetune(model=str(llama_dir), train=sst2["train"], val=sst2["val"], output=tmp_path / "lora",
                      method="lora", max_steps=3, batch_size=16, rank=4, num_hp=2, **QUIET)
    assert result.method == "lora" and result.task == "causal-lm" and result.head_params == 0
    assert result.best_val_accuracy is not None and result.lora_rank is not None
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    sidecar = json.loads((tmp_path / "lora" / "lily_deploy.json").read_text())
    assert sidecar["routing"] is None and sidecar["task"] == "causal-lm"


def test_batch_routing_is_allowed_with_a_warning(llama_dir, sst2, tmp_path):
    lines: list[str] = []
    finetune(model=str(llama_dir), train=sst2["train"], output=tmp_path / "batch", routing="batch", max_steps=2,
             batch_size=16, rank=4, num_hp=2, progress=False, log=lines.append)
    warning = [line for line in lines if line.startswith("warning: routing batch")]
    assert len(warning) == 1 and "KV cache" in warning[0] and "prompt or causal" in warning[0]
    assert json.loads((tmp_path / "batch" / "lily_deploy.json").read_text())["routing"] == "batch"


def test_plain_text_rows_learn_every_token(llama_dir, sst2, tmp_path):
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": s} for s, _ in sst2["rows"][:32]])
    result = finetune(model=str(llama_dir), train=texts, val=texts, output=tmp_path / "text", routing="token",
                      max_steps=2, batch_size=16, rank=4, num_hp=2, **QUIET)
    evals = [r for r in _log(tmp_path / "text") if r.get("event") == "eval"]
    assert result.best_val_accuracy is not None and evals[-1]["val_tokens"] > 3 * 32  # every token after the first
    # prompt routing mixes by the prompt, which a text row does not have
    line = _error_line(_cli(llama_dir, texts, texts, tmp_path / "o", "--max-steps", "1"))
    assert "--train" in line and "texts.jsonl: line 1 is a plain text" in line and "causal or token" in line


# ------------------------------------------------------------------ bad input and settings
def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def _usage_error(result, flag: str) -> str:
    assert result.exit_code == 2, result.output
    assert f"'{flag}'" in result.output and "Traceback" not in result.output, result.output
    return result.output


def test_cli_refuses_routings_a_causal_lm_cannot_take(llama_dir, sst2, tmp_path):
    out = tmp_path / "o"
    text = _usage_error(_cli(llama_dir, sst2["train"], sst2["val"], out, "--routing", "sample"), "--routing")
    assert "cached keys and values go stale" in text and "use prompt or causal" in text
    _usage_error(_cli(llama_dir, sst2["train"], sst2["val"], out, "--routing", "static"), "--routing")
    text = _usage_error(_cli(llama_dir, sst2["train"], sst2["val"], out, "--method", "lora", "--routing", "prompt"),
                        "--routing")
    assert "applies to Lily only" in text
    _usage_error(_cli(llama_dir, sst2["train"], sst2["val"], out, "--task", "lm"), "--task")
    text = _usage_error(_cli(llama_dir, sst2["train"], sst2["val"], out, "--text-column", "body"), "--text-column")
    assert "causal-LM data is JSONL" in text
    assert not out.exists()


def test_cli_refuses_bad_causal_data_in_one_line(llama_dir, sst2, tmp_path):
    out = tmp_path / "o"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": " b"}, {"question": "c"}])
    line = _error_line(_cli(llama_dir, bad, sst2["val"], out, "--max-steps", "1"))
    assert "--train" in line and "bad.jsonl: line 2 has neither 'prompt'" in line and "question" in line
    no_response = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "a"}])
    line = _error_line(_cli(llama_dir, sst2["train"], no_response, out, "--max-steps", "1"))
    assert "--val" in line and "line 1 has a 'prompt' but no 'response'" in line
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\ngood\t1\n")
    line = _error_line(_cli(llama_dir, tsv, sst2["val"], out, "--max-steps", "1"))
    assert "train.tsv" in line and "causal-LM data is JSONL" in line
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": _prompt("a " * 40), "response": " positive"}])
    line = _error_line(_cli(llama_dir, long, sst2["val"], out, "--max-steps", "1", "--max-length", "16"))
    assert "long.jsonl: line 1: no token to learn within max_length 16" in line
    assert not out.exists()


def test_gpt2_conv1d_is_refused_in_one_line(tokenizer, sst2, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128))
    base = _save(model, tokenizer, tmp_path / "gpt2")
    line = _error_line(_cli(base, sst2["train"], sst2["val"], tmp_path / "o", "--max-steps", "1"))
    assert "targets 'c_attn'" in line and "Conv1D" in line and "nn.Linear only" in line
    assert "no Linear modules to adapt" in line


def test_config_resolves_task_and_routing_from_the_model(llama_dir, tmp_path):
    from lily_deploy.training import detect_task, resolve_model_fields

    need = dict(train="t.jsonl", output=tmp_path / "o")
    assert detect_task(str(llama_dir)) == "causal-lm" and detect_task("no/such/model") is None
    config = FinetuneConfig(model=str(llama_dir), **need)
    assert config.task is None and config.routing is None
    resolved = resolve_model_fields(config)
    assert (resolved.task, resolved.routing) == ("causal-lm", "prompt")
    assert resolve_model_fields(config.replace(method="lora")).routing == "batch"
    assert resolve_model_fields(FinetuneConfig(model="minilm", **need)).routing == "sample"  # as export deploys
    # a task given for a model not here yet: the decoder routings are checked against it
    assert FinetuneConfig(model="m", task="causal-lm", routing="token", **need).routing == "token"
    cases = [({"model": str(llama_dir), "routing": "sample"}, "routing", "cached keys and values go stale"),
             ({"model": "m", "task": "causal-lm", "routing": "static"}, "routing", "choose one of"),
             ({"model": "m", "task": "lm"}, "task", "choose one of"),
             ({"model": "m", "routing": "prompt"}, "routing", "are for causal LMs"),
             ({"model": str(llama_dir), "label_column": "y"}, "label_column", "causal-LM data is JSONL")]
    for changes, name, detail in cases:
        with pytest.raises(ConfigError) as info:
            FinetuneConfig(**{**need, **changes})
        assert info.value.field == name and detail in str(info.value), str(info.value)


def test_routing_hooks_take_the_decoder_modes(llama_run, llama_dir):
    peft_model, hooks = _peft_with_hooks(llama_run["out"], llama_dir, "token")
    hooks.remove()
    with pytest.raises(LilyDeployError, match="routing 'static': choose one of batch, sample, token, prompt, causal"):
        route_lily_layers(peft_model, "static")


# ------------------------------------------------------------------ reading and encoding prompt files
def test_read_prompt_table_keeps_rows_as_written(tmp_path):
    from lily_deploy.core.data import read_prompt_table

    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "Q: 2+2?\\nA:", "response": " 4"}\n\n{"text": "plain words"}\n{"prompt": "Hi"}\n')
    table = read_prompt_table(path)
    assert table.prompts == ["Q: 2+2?\nA:", None, "Hi"] and table.responses == [" 4", None, None]
    assert table.texts == [None, "plain words", None] and table.lines == [1, 3, 4] and len(table) == 3
    picked = table.select([2, 0])
    assert picked.prompts == ["Hi", "Q: 2+2?\nA:"] and picked.lines == [4, 1]
    assert read_prompt_table(path, limit=1).lines == [1]
    with pytest.raises(LilyDeployError, match=r"mixed.jsonl: line 4 has a 'prompt' but no 'response'"):
        read_prompt_table(path, require_response=True)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "text": "b"}\n', "line 1 has both 'prompt' and 'text'"),
    ('{"text": "a", "response": "b"}\n', "line 1 has a 'response' but no 'prompt'"),
    ('{"prompt": 3, "response": "b"}\n', "line 1: 'prompt' must be a string, got int"),
    ('{"prompt": "  ", "response": "b"}\n', "line 1: 'prompt' is empty"),
    ('{"text": "a"}\n[1, 2]\n', "line 2 is a JSON list"),
    ('{"text": "a"\n', "line 1 is not JSON"),
    ('\n\n', "no data rows"),
])
def test_read_prompt_table_refuses_bad_lines_naming_them(tmp_path, content, message):
    from lily_deploy.core.data import read_prompt_table

    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(LilyDeployError) as info:
        read_prompt_table(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value) and "\n" not in str(info.value)


def test_read_prompt_table_refuses_other_files(tmp_path):
    from lily_deploy.core.data import read_prompt_table

    with pytest.raises(LilyDeployError, match="does not exist"):
        read_prompt_table(tmp_path / "none.jsonl")
    with pytest.raises(LilyDeployError, match="causal-LM data is JSONL"):
        read_prompt_table(tmp_path / "rows.tsv")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(LilyDeployError, match="not UTF-8"):
        read_prompt_table(tmp_path / "latin1.jsonl")


def test_lm_examples_label_the_response_and_pad_on_the_right(tokenizer):
    from lily_deploy.core.data import IGNORE_INDEX, lm_batch, lm_example, lm_pad_id, prompt_ids

    prompt, response = _prompt("a fine film"), " positive"
    ids, labels = lm_example(tokenizer, prompt, response, 128)
    head = prompt_ids(tokenizer, prompt)
    word = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert ids == head + word + [tokenizer.eos_token_id]  # the prompt as generation sees it, then response, EOS
    assert labels == [IGNORE_INDEX] * len(head) + word + [tokenizer.eos_token_id]
    cut_ids, cut_labels = lm_example(tokenizer, prompt, response, len(head) + 1)
    assert cut_ids == ids[:len(head) + 1] and cut_labels == labels[:len(head) + 1]
    text_ids, text_labels = lm_example(tokenizer, None, "a fine film", 128)
    assert text_ids == text_labels and text_ids[-1] == tokenizer.eos_token_id
    batch = lm_batch([(ids, labels), (text_ids, text_labels)], lm_pad_id(tokenizer))
    n, width = len(text_ids), len(ids)
    assert batch["input_ids"].shape == (2, width) and batch["attention_mask"][1].tolist() == [1] * n + [0] * (width - n)
    assert batch["input_ids"][0].tolist() == ids and batch["labels"][0].tolist() == labels
    assert (batch["input_ids"][1, n:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()


def test_lm_pad_id_falls_back_to_eos():
    from types import SimpleNamespace

    from lily_deploy.core.data import lm_pad_id

    assert lm_pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert lm_pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0
    assert lm_pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) is None


# ------------------------------------------------------------------ a trained decoder, deployed
def test_trained_decoder_generates_the_same_on_onnxruntime(llama_run, sst2, tmp_path):
    """The fine-tuned adapter (prompt routing) exported with its cache: onnxruntime == torch, token for token,
    on the held-out prompts alone and in left-padded batches; and generation answers as the training measured."""
    import numpy as np

    from lily_deploy.core.data import prompt_ids, read_prompt_table
    from lily_deploy.core.deploy import load_model
    from lily_deploy.generation import decode, special_ids
    from lily_deploy.onnx_export import export_onnx
    from lily_deploy.runtime.decoder import TorchDecoder
    from lily_deploy.runtime.decoder_ort import OrtDecoder

    result = export_onnx(source=llama_run["out"], output=tmp_path / "llm.onnx")  # routing as trained: prompt
    assert result.passed and result.routing == "prompt"
    model = load_model(llama_run["out"])
    table = read_prompt_table(sst2["val"])
    ids = [prompt_ids(model.tokenizer, p) for p in table.prompts]
    eos, pad = special_ids(model.tokenizer)
    ref, ref_steps = decode(TorchDecoder(model), ids, 4, None, pad, record_logits=True)
    got, got_steps = decode(OrtDecoder(tmp_path / "llm.onnx"), ids, 4, None, pad, record_logits=True)
    assert got == ref
    assert max(np.abs(g - r).max() for g, r in zip(got_steps, ref_steps)) < 1e-4
    alone = [decode(OrtDecoder(tmp_path / "llm.onnx"), [one], 4, None, pad)[0][0] for one in ids[:8]]
    assert alone == got[:8]
    # classification by generation: the first generated word is the trained answer at least as often as chance
    words = [model.tokenizer.decode(t[:1]).strip() for t in got]
    answers = [r.strip() for r in table.responses]
    assert sum(w == a for w, a in zip(words, answers)) / len(answers) >= 0.5
