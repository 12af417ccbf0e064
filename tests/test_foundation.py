"""Foundation: the deploy-time Lily layer against PEFT and independent references, PEFT interop,
deploy checkpoints, ``inspect``, and bad adapters."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import SENTENCES, data_file
from lily_deploy.core.adapters import load_adapter
from lily_deploy.cli import cli
from lily_deploy.core.deploy import from_peft, load_deploy, load_model, save_deploy
from lily_deploy.core.lily import LilyLinear


def _text_batch(tokenizer, texts, pad_to=None):
    kwargs = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": True}
    return dict(tokenizer(list(texts), return_tensors="pt", **kwargs))


def _peft_and_deploy(adapter):
    peft_model, base, info = load_adapter(adapter)
    deploy = from_peft(copy.deepcopy(peft_model), base, info, mode="batch")
    return peft_model, deploy


@pytest.mark.parametrize("adapter_fixture", ["minilm_adapter", "tiny_roberta_adapter"])
def test_batch_mode_reproduces_peft_text(adapter_fixture, request):
    peft_model, deploy = _peft_and_deploy(request.getfixturevalue(adapter_fixture))
    tok = deploy.tokenizer
    with torch.no_grad():
        for texts, pad_to in [(SENTENCES[:1], None), (SENTENCES[:3], None), (SENTENCES, None), (SENTENCES[:2], 40)]:
            batch = _text_batch(tok, texts, pad_to)
            ref = peft_model(**batch).logits
            got = deploy.logits(**batch)
            assert (got - ref).abs().max().item() <= 1e-6
    assert len(deploy.layers) > 0


def test_batch_mode_reproduces_peft_vit(tiny_vit_adapter):
    peft_model, deploy = _peft_and_deploy(tiny_vit_adapter)
    assert deploy.task == "image-cls"
    torch.manual_seed(0)
    with torch.no_grad():
        for n in (1, 3, 5):
            x = torch.randn(n, 3, 32, 32)
            assert (deploy.logits(pixel_values=x) - peft_model(pixel_values=x).logits).abs().max() <= 1e-6


def test_sample_mode_is_batch_and_padding_invariant(minilm_adapter):
    _, deploy = _peft_and_deploy(minilm_adapter)
    tok = deploy.tokenizer
    with torch.no_grad():
        alone_batch = [deploy.logits(**_text_batch(tok, [s])) for s in SENTENCES]
        deploy.set_routing("sample")
        alone = [deploy.logits(**_text_batch(tok, [s])) for s in SENTENCES]
        # one unpadded sample: sample routing == batch routing
        for a, b in zip(alone, alone_batch):
            assert (a - b).abs().max() <= 1e-6
        mixed = deploy.logits(**_text_batch(tok, SENTENCES, pad_to=48))
        invariance_error = max((mixed[i] - a[0]).abs().max().item() for i, a in enumerate(alone))
        assert invariance_error <= 1e-5
        deploy.set_routing("batch")
        mixed_batch = deploy.logits(**_text_batch(tok, SENTENCES, pad_to=48))
    drift = max((mixed_batch[i] - alone_batch[i][0]).abs().max().item() for i in range(len(SENTENCES)))
    assert drift > 1e-4 and drift > 100 * invariance_error, "batch routing should depend on the batch it is in"


def _layer_inputs(layer: LilyLinear, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, layer.in_features, generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    return x, mask


def _pool(layer):
    return layer.hp.weight.detach().reshape(layer.num_hp, layer.rank, layer.out_features)


def test_token_and_sample_modes_match_loops(minilm_adapter):
    _, deploy = _peft_and_deploy(minilm_adapter)
    name, layer = next(iter(deploy.layers.items()))
    x, mask = _layer_inputs(layer)
    pool = _pool(layer)
    A, R = layer.lp.weight.detach(), layer.router.weight.detach()
    W, b = layer.base.weight.detach(), layer.base.bias.detach()
    with torch.no_grad():
        layer.mode = "token"
        got_token = layer(x)
        layer.mode = "sample"
        layer.context.mask = mask
        got_sample = layer(x)
        layer.context.mask = None
    ref_token = torch.empty_like(got_token)
    ref_sample = torch.empty_like(got_sample)
    for i in range(x.shape[0]):
        ps = []
        for t in range(x.shape[1]):
            h = A @ x[i, t]
            p = F.softmax(R @ h, dim=0)
            if mask[i, t]:
                ps.append(p)
            mixed = sum(p[e] * pool[e] for e in range(layer.num_hp))
            ref_token[i, t] = W @ x[i, t] + b + layer.scale * (h @ mixed)
        p_mean = torch.stack(ps).mean(0)
        mixed = sum(p_mean[e] * pool[e] for e in range(layer.num_hp))
        for t in range(x.shape[1]):
            ref_sample[i, t] = W @ x[i, t] + b + layer.scale * ((A @ x[i, t]) @ mixed)
    assert (got_token - ref_token).abs().max() <= 1e-5
    assert (got_sample - ref_sample).abs().max() <= 1e-5


def test_static_mode_equals_folded_linear(minilm_adapter):
    _, deploy = _peft_and_deploy(minilm_adapter)
    layer = next(iter(deploy.layers.values()))
    x, _ = _layer_inputs(layer, seed=1)
    p = torch.tensor([0.5, 0.3, 0.2])
    layer.set_static(p)
    pool = _pool(layer)
    mixed = sum(p[e] * pool[e] for e in range(3))
    with torch.no_grad():
        ref = F.linear(x, layer.base.weight, layer.base.bias) + layer.scale * ((x @ layer.lp.weight.t()) @ mixed)
        assert (layer(x) - ref).abs().max() <= 1e-5
        folded = layer.folded_linear()
        assert type(folded) is torch.nn.Linear
        assert (folded(x) - layer(x)).abs().max() <= 1e-5


def test_hp_pools_and_lps_are_shared_not_copied(minilm_adapter):
    peft_model, deploy = _peft_and_deploy(minilm_adapter)
    layers = deploy.layers
    q = [l for n, l in layers.items() if n.endswith("query")]
    v = [l for n, l in layers.items() if n.endswith("value")]
    assert all(l.hp is q[0].hp for l in q) and all(l.hp is v[0].hp for l in v) and q[0].hp is not v[0].hp
    assert q[0].lp is q[1].lp and q[1].lp is not q[2].lp  # stride 2
    assert len({id(l.router) for l in layers.values()}) == len(layers)


def test_round_trip_to_peft_is_bit_identical(minilm_adapter, tmp_path):
    from peft import get_peft_model_state_dict

    from lily_deploy.core.peft_bridge import deploy_to_peft

    peft_model, deploy = _peft_and_deploy(minilm_adapter)
    back = deploy_to_peft(deploy)
    a, b = get_peft_model_state_dict(peft_model), get_peft_model_state_dict(back)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the round-tripped PEFT model saves an adapter PEFT and lily-deploy both load
    back.save_pretrained(str(tmp_path / "again"))
    again = load_model(tmp_path / "again")
    batch = _text_batch(deploy.tokenizer, SENTENCES)
    with torch.no_grad():
        assert torch.equal(again.logits(**batch), deploy.logits(**batch))


def test_deploy_checkpoint_round_trip(minilm_adapter, tmp_path):
    _, deploy = _peft_and_deploy(minilm_adapter)
    deploy.set_routing("sample")
    first = next(iter(deploy.layers.values()))
    first.set_static(torch.tensor([0.2, 0.2, 0.6]))
    save_deploy(deploy, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "deploy_config.json").read_text())
    assert config["adapter"]["sha256"] and config["base_model"] == "minilm"
    assert config["layers"][next(iter(deploy.layers))]["static_p"] == pytest.approx([0.2, 0.2, 0.6])
    loaded = load_deploy(tmp_path / "ckpt")
    assert [l.mode for l in loaded.layers.values()] == [l.mode for l in deploy.layers.values()]
    assert next(iter(loaded.layers.values())).lp is list(loaded.layers.values())[2].lp  # layer 0/1 query share
    batch = _text_batch(deploy.tokenizer, SENTENCES)
    with torch.no_grad():
        assert torch.equal(loaded.logits(**batch), deploy.logits(**batch))


def test_inspect_cli_table_json_and_router_stats(minilm_adapter):
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", str(minilm_adapter)])
    assert result.exit_code == 0, result.output
    assert "query/0" in result.output and "HP pools" in result.output and "trainable" in result.output
    dev = data_file("sst2", "dev.tsv")
    result = runner.invoke(cli, ["inspect", str(minilm_adapter), "--data", str(dev), "--size", "16", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["rank"] == 8 and info["num_hp"] == 3 and info["lp_stride"] == 2
    assert info["params"]["adapter"] == 6 * 2 * 3 * 0 + (3 * 2 * 8 * 384) + 2 * 3 * 8 * 384 + 12 * 3 * 8
    stats = info["router_stats"]
    assert len(stats) == 12
    for s in stats.values():
        assert s["samples"] == 16 and abs(sum(s["mean"]) - 1) < 1e-4 and s["spread"] >= 0
        assert 0 <= s["entropy_of_mean"] <= s["max_entropy"] + 1e-6


# ---- bad input: one line, exit 1, no traceback ---------------------------------------------------

def _fails(args, *needles, code=1):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result


def test_not_an_adapter_folder(tmp_path):
    _fails(["inspect", str(tmp_path)], "neither a PEFT adapter folder nor a lily-deploy checkpoint")
    _fails(["inspect", str(tmp_path / "nope")], "does not exist")


def test_adapter_of_another_peft_type(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lily_deploy.core.models import load_base

    base = load_base("minilm", num_labels=2)
    get_peft_model(base.model, LoraConfig(r=2, target_modules=["query"])).save_pretrained(str(tmp_path / "lora"))
    _fails(["inspect", str(tmp_path / "lora")], "LORA adapter", "Lily")


def test_adapter_that_does_not_fit_the_base(tiny_roberta_adapter, tmp_path):
    _fails(["inspect", str(tiny_roberta_adapter), "--base", "minilm"], "does not fit", "no layer roberta.encoder")
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_roberta_adapter, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("layer.1.attention.self.value.lily_A.weight"))
    tensors[key] = torch.zeros(8, 48)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    _fails(["inspect", str(bad)], "does not fit", "layer.1.attention.self.value.lily_A", "[8, 48]", "[8, 32]")


def test_truncated_safetensors(minilm_adapter, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(minilm_adapter, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    _fails(["inspect", str(broken)], "adapter_model.safetensors", "truncated")


def test_missing_base_model(minilm_adapter, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(minilm_adapter, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "no-such-model")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    _fails(["inspect", str(moved)], "no-such-model", "not found", "--base")


def test_unknown_routing_mode(minilm_adapter, tmp_path):
    _fails(["export", str(minilm_adapter), "-o", str(tmp_path / "m.onnx"), "--routing", "zigzag"],
           "--routing", code=2)
    _, deploy = _peft_and_deploy(minilm_adapter)
    save_deploy(deploy, tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "deploy_config.json"
    cfg = json.loads(cfg_path.read_text())
    next(iter(cfg["layers"].values()))["mode"] = "zigzag"
    cfg_path.write_text(json.dumps(cfg))
    _fails(["inspect", str(tmp_path / "ckpt")], "unknown routing mode 'zigzag'")


def test_help_works_without_heavy_extras():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and "export" in result.output and "inspect" in result.output
