"""PEFT's Lily forward, pinned: a PEFT release that changes it fails here, not in a user's deployment.

Training's routing hooks (``training.route_lily_layers``) compute the update with the deploy
layer's math; in ``batch`` mode they must give PEFT's own output (values and gradients), in
``sample`` mode a per-sample loop, and a PEFT outside the tested versions is refused up front.
"""
from __future__ import annotations

import pytest
import torch

from conftest import SENTENCES
from lily_deploy.core.errors import LilyDeployError
from lily_deploy.core.lily import hp_mix_reference
from lily_deploy.core.peft_bridge import PEFT_TESTED, check_peft_version
from lily_deploy.training import build_model, route_lily_layers


@pytest.fixture(scope="module")
def lily(tiny_roberta_dir):
    """PEFT's Lily on a tiny RoBERTa (three target types, shared LPs) with non-zero HPs and routers, in eval mode."""
    from lily_deploy.core.data import encode_batch
    from lily_deploy.core.models import load_base

    torch.manual_seed(0)
    base = load_base(str(tiny_roberta_dir), num_labels=2)
    model = build_model(base, rank=4, num_hp=3, lp_stride=2, scale=0.7,
                        targets=["query", "value", "intermediate.dense"]).peft_model.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lily_B" in name or "lily_router" in name:  # PEFT starts the HPs at zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    batch = encode_batch(base, SENTENCES)
    assert (batch["attention_mask"] == 0).any()  # sentences of different lengths: padding in the batch
    return {"base": base, "model": model, "batch": batch}


def _logits(model, batch, grads: bool = False):
    """The last hidden state (values near 1, unlike the tiny head's logits) and, with ``grads``, the gradient
    of a fixed random projection of it for every Lily parameter."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    if not grads:
        return hidden, {}
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3))
    (hidden * weights).sum().backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lily_" in n}


def _lily_layers(model) -> dict:
    from peft.tuners.lily.layer import LilyLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LilyLayer)}


def test_peft_lily_layer_is_base_plus_our_batch_mix(lily):
    """Layer by layer, on a raw input: PEFT's Lily Linear == base + hp_mix_reference(batch)."""
    g = torch.Generator().manual_seed(2)
    layers = _lily_layers(lily["model"])
    assert len(layers) == 12
    with torch.no_grad():
        for name, layer in layers.items():
            x = torch.randn(3, 5, layer.in_features, generator=g)
            h = layer.lily_A["default"](x)
            ours = layer.base_layer(x) + hp_mix_reference(h, layer.lily_router["default"](h),
                                                          layer.lily_B["default"].weight, None, "batch",
                                                          layer.scaling["default"])
            delta = ours - layer.base_layer(x)
            assert delta.abs().max() > 1e-3, name  # the adapter does something
            assert torch.allclose(layer(x), ours, atol=1e-6), name


def test_batch_mode_hooks_reproduce_peft_values_and_gradients(lily):
    model, batch = lily["model"], lily["batch"]
    plain, plain_grads = _logits(model, batch, grads=True)
    with model.disable_adapter():
        bare, _ = _logits(model, batch)
    assert not torch.allclose(plain, bare, atol=1e-2)  # the adapter changes the output
    hooks = route_lily_layers(model, "batch")
    try:
        ours, our_grads = _logits(model, batch, grads=True)
        with model.disable_adapter():  # a disabled adapter stays disabled under the hooks
            assert torch.equal(_logits(model, batch)[0], bare)
    finally:
        hooks.remove()
    assert torch.allclose(ours, plain, atol=1e-6)
    assert plain_grads.keys() == our_grads.keys() and len(plain_grads) > 0
    for n in plain_grads:
        assert torch.allclose(our_grads[n], plain_grads[n], atol=1e-6, rtol=1e-5), n
    assert torch.equal(_logits(model, batch)[0], plain)  # remove() gives PEFT's forward back


def test_sample_mode_is_a_per_sample_loop_and_peft_for_one_sample(lily):
    from lily_deploy.core.data import encode_batch

    model, batch, base = lily["model"], lily["batch"], lily["base"]
    lengths = batch["attention_mask"].sum(-1).tolist()
    plain, _ = _logits(model, batch)
    singles = [encode_batch(base, [t]) for t in SENTENCES]
    peft_alone = [_logits(model, one)[0][0] for one in singles]  # PEFT: one unpadded sample a batch
    hooks = route_lily_layers(model, "sample")
    try:
        together, grads = _logits(model, batch, grads=True)
        alone = [_logits(model, one)[0][0] for one in singles]
    finally:
        hooks.remove()
    for i, n in enumerate(lengths):  # each sample's real tokens, in the padded batch and on their own
        assert alone[i].shape[0] == n
        assert torch.allclose(together[i, :n], alone[i], atol=1e-5), i  # batch- and padding-invariant
        assert torch.allclose(alone[i], peft_alone[i], atol=1e-5), i  # one sample without padding: PEFT's mix
    assert not torch.allclose(together, plain, atol=1e-3)  # and the routing matters for this batch
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lily_B" in n)  # the HPs learn through our path


def test_routing_hooks_refuse_what_they_cannot_route(lily, tiny_roberta_dir):
    from lily_deploy.core.models import load_base

    with pytest.raises(LilyDeployError, match="routing 'static': choose one of batch, sample, token"):
        route_lily_layers(lily["model"], "static")
    lora = build_model(load_base(str(tiny_roberta_dir), num_labels=2), method="lora", targets=["query"]).peft_model
    with pytest.raises(LilyDeployError, match="no Lily layers"):
        route_lily_layers(lora, "sample")


@pytest.mark.parametrize("version", ["0.18.1", "0.22.0", "0.22.0.dev0", "1.0.0"])
def test_peft_outside_the_tested_range_is_refused_in_one_line(version, monkeypatch, lily, tiny_roberta_dir):
    import peft

    from lily_deploy.core.models import load_base

    (lo, hi) = PEFT_TESTED
    installed = tuple(int(v) for v in peft.__version__.split(".")[:2])
    assert lo <= installed < hi  # the range includes the PEFT these tests ran with
    check_peft_version()
    monkeypatch.setattr(peft, "__version__", version)
    spec = f"peft>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"
    for call in (check_peft_version, lambda: route_lily_layers(lily["model"], "sample"),
                 lambda: build_model(load_base(str(tiny_roberta_dir), num_labels=2), targets=["query"])):
        with pytest.raises(LilyDeployError) as info:
            call()
        message = str(info.value)
        assert f"peft {version} is not supported" in message and spec in message and "\n" not in message
