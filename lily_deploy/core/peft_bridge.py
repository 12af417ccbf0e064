"""PEFT-Lily model <-> deploy model (``LilyLinear`` layers), sharing exactly as PEFT shares.

PEFT ties LPs and HP pools by reusing the same ``nn.Linear`` objects across layers; the
conversion keeps those very objects (no copies), so a deploy model has one LP per group and
one HP pool per target type, and the round trip back to PEFT is bit-identical.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from .errors import LilyDeployError
from .lily import HPPool, LilyLinear, RoutingContext, lily_layers


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def target_of(name: str, targets) -> Optional[str]:
    """The entry of ``targets`` PEFT files layer ``name`` under, or None when no entry adapts it.

    The one target rule (adapting, counting and the deploy conversion all use it), as PEFT has it:
    a layer is adapted when its path IS an entry or ends in ``.entry``, and it shares LPs and an HP
    pool with the layers of the entry its path ends with. A string (PEFT's regex form) is one
    group. When a path ends with several entries (``dense`` and ``intermediate.dense``) PEFT
    picks one by set order, which changes between processes: :func:`lily_deploy.training.resolve_targets` refuses such
    targets, and here the longest wins.
    """
    if isinstance(targets, str):
        return targets
    targets = list(targets or [])
    if not any(name == t or name.endswith("." + t) for t in targets):
        return None
    return max((t for t in targets if name.endswith(t)), key=len)


# the PEFT releases whose Lily forward tests/test_training_peft.py pins (major, minor): [low, high)
PEFT_TESTED = ((0, 19), (0, 22))


def check_peft_version() -> None:
    """Refuse a PEFT whose Lily forward the tests have not pinned (tests/test_training_peft.py)."""
    import peft
    from packaging.version import Version

    (lo, hi), found = PEFT_TESTED, Version(peft.__version__).release[:2]
    if not lo <= found < hi:
        spec = f"peft>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"
        raise LilyDeployError(f"peft {peft.__version__} is not supported: lily-deploy trains PEFT's Lily as "
                              f"tested with {spec} (pip install '{spec}')")


def peft_to_deploy(
    peft_model: Any, mode: str = "batch", context: Optional[RoutingContext] = None
) -> tuple[nn.Module, RoutingContext, dict[str, dict]]:
    """Turn a PEFT-Lily model into its plain base model with ``LilyLinear`` layers, in place.

    Returns ``(model, context, layer_specs)`` where ``layer_specs`` names, per layer, its
    target, LP group and HP pool (used by the deploy config and ``inspect``).
    """
    from peft.tuners.lily.layer import Linear as PeftLilyLinear
    from peft.utils.other import ModulesToSaveWrapper

    check_peft_version()
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    model = peft_model.base_model.model
    context = context or RoutingContext()
    pools: dict[int, HPPool] = {}
    lp_ids: dict[int, str] = {}
    pool_ids: dict[int, str] = {}
    specs: dict[str, dict] = {}
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            replacements.append((name, module.modules_to_save[adapter]))
        elif isinstance(module, PeftLilyLinear):
            if adapter not in module.lily_A:
                continue
            lp, peft_b, router = module.lily_A[adapter], module.lily_B[adapter], module.lily_router[adapter]
            target = target_of(name, config.target_modules) or name.rsplit(".", 1)[-1]
            if id(peft_b) not in pools:
                pool = HPPool(module.num_B[adapter], module.r[adapter], module.out_features)
                pool.weight = peft_b.weight  # the very Parameter PEFT shares
                pools[id(peft_b)] = pool
                same_target = sum(1 for v in pool_ids.values() if v.split("@")[0] == target)
                pool_ids[id(peft_b)] = target if not same_target else f"{target}@{same_target}"
            if id(lp) not in lp_ids:
                n = sum(1 for v in lp_ids.values() if v.startswith(target + "/"))
                lp_ids[id(lp)] = f"{target}/{n}"
            layer = LilyLinear(module.get_base_layer(), lp, router, pools[id(peft_b)],
                               module.scaling[adapter], mode=mode, context=context)
            replacements.append((name, layer))
            specs[name] = {"target": target, "lp": lp_ids[id(lp)], "hp_pool": pool_ids[id(peft_b)]}
    for name, new in replacements:
        set_module(model, name, new)
    if not specs:
        raise LilyDeployError("the PEFT model has no Lily layers for its active adapter")
    return model, context, specs


def deploy_to_peft(deploy: Any) -> Any:
    """A PEFT-Lily model with a ``LilyDeployModel``'s weights (a copy; the deploy model is untouched)."""
    from peft import LilyConfig, get_peft_model

    check_peft_version()
    if deploy.folded:
        raise LilyDeployError(
            f"layer {next(iter(deploy.folded))} is folded into its base weight; a folded model cannot go back to PEFT"
        )
    model = copy.deepcopy(deploy.model)
    layers = lily_layers(model)
    for name, layer in layers.items():
        set_module(model, name, layer.base)
    if hasattr(model, "peft_config"):  # left on the base model by the PEFT model it came from
        del model.peft_config
    cfg = LilyConfig(**deploy.meta["lily"])
    cfg.inference_mode = False
    peft_model = get_peft_model(model, cfg)
    adapter = peft_model.active_adapter
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, layer in layers.items():
            target = inner.get_submodule(name)
            target.lily_A[adapter].weight.copy_(layer.lp.weight)
            target.lily_B[adapter].weight.copy_(layer.hp.weight)
            target.lily_router[adapter].weight.copy_(layer.router.weight)
    peft_model.eval()
    return peft_model
