"""``inspect``: what a Lily model is made of, and (given data) how its routers behave."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .core.deploy import load_model
from .core.errors import LilyDeployError


def describe(path: str | Path, data: Optional[str] = None, base: Optional[str] = None, size: int = 256,
             batch_size: int = 16, text_column: Optional[str] = None) -> dict:
    """A JSON-able description of an adapter folder or deploy checkpoint."""
    model = load_model(path, base=base)
    layers = model.layers
    lily = model.meta["lily"]
    lp_groups: dict[str, list[str]] = {}
    pools: dict[str, dict] = {}
    for name, spec in model.layer_specs.items():
        if name not in layers:
            continue
        lp_groups.setdefault(spec["lp"], []).append(name)
        layer = layers[name]
        pool = pools.setdefault(spec["hp_pool"], {"shape": [layer.num_hp, layer.rank, layer.out_features], "layers": []})
        pool["layers"].append(name)
    adapter_params = {id(p): p.numel() for layer in layers.values()
                      for mod in (layer.lp, layer.router, layer.hp) for p in mod.parameters()}
    head = set(lily.get("modules_to_save") or [])
    head_params = {id(p): p.numel() for n, p in model.model.named_parameters()
                   if any(f".{h}." in f".{n}" for h in head)}
    total = {id(p): p.numel() for p in model.model.parameters()}
    adapter_n = sum(adapter_params.values())
    head_n = sum(v for k, v in head_params.items() if k not in adapter_params)
    base_n = sum(total.values()) - adapter_n
    info = {
        "path": str(path),
        "kind": "deploy checkpoint" if (Path(path) / "deploy_config.json").exists() else "PEFT adapter",
        "base_model": model.meta["base_model"],
        "task": model.task,
        "labels": model.labels,
        "targets": lily.get("target_modules"),
        "rank": lily["r"],
        "num_hp": lily["num_B"],
        "lp_stride": lily["stride_A"],
        "scale": lily["scaling"],
        "lp_groups": lp_groups,
        "hp_pools": pools,
        "params": {"adapter": adapter_n, "head": head_n, "trainable": adapter_n + head_n, "base": base_n,
                   "trainable_pct": round(100.0 * (adapter_n + head_n) / max(base_n, 1), 4)},
        "layers": {name: {**model.layer_specs[name], "mode": layer.mode} for name, layer in layers.items()},
        "folded": sorted(model.folded),
        "adapter": model.meta.get("adapter"),
    }
    if data is not None and model.task == "seq2seq":
        raise LilyDeployError(f"--data {data}: router statistics of a seq2seq (encoder-decoder) model are not "
                              "supported yet (its forward needs decoder inputs); inspect it without --data")
    if data is not None:
        from .calib.router_stats import collect

        info["router_stats"] = collect(model, _batches(model, data, batch_size, size, text_column))
    return info


def _batches(model, data: str, batch_size: int, size: Optional[int], text_column: Optional[str]):
    """Model inputs from a text table, an image folder, or an ``.npz`` of input arrays (as the other stages take)."""
    if str(data).lower().endswith(".npz"):
        from .core.data import read_npz_inputs

        arrays = read_npz_inputs(data, model.input_names)
        n = next(iter(arrays.values())).shape[0]
        n = min(n, size) if size else n
        return [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]
    from .calib.readers import torch_batches

    return torch_batches(model, data, batch_size=batch_size, size=size, text_column=text_column)


def format_table(info: dict) -> str:
    """The human-readable form of :func:`describe`'s result."""
    lines = [
        f"{info['kind']}: {info['path']}",
        f"  base model   {info['base_model']} ({info['task']})" + (f", labels {info['labels']}" if info.get("labels") else ""),
        f"  Lily         targets {info['targets']}, rank {info['rank']}, {info['num_hp']} HPs per pool, "
        f"LP stride {info['lp_stride']}, scale {info['scale']}",
        f"  parameters   adapter {info['params']['adapter']:,} + head {info['params']['head']:,} = "
        f"{info['params']['trainable']:,} trainable vs base {info['params']['base']:,} ({info['params']['trainable_pct']}%)",
        "  LP groups:",
    ]
    for gid, names in info["lp_groups"].items():
        lines.append(f"    {gid:<14} {', '.join(names)}")
    lines.append("  HP pools:")
    for pid, pool in info["hp_pools"].items():
        lines.append(f"    {pid:<14} shape {pool['shape']} used by {len(pool['layers'])} layers")
    if info["folded"]:
        lines.append(f"  folded       {len(info['folded'])} layers: {', '.join(info['folded'])}")
    stats = info.get("router_stats")
    header = f"  {'layer':<48} {'mode':<7}"
    if stats:
        header += f" {'mean mixing vector':<30} {'spread':>8} {'H(mean)':>8}"
    lines.append(header)
    for name, layer in info["layers"].items():
        row = f"  {name:<48} {layer['mode']:<7}"
        if stats and name in stats:
            s = stats[name]
            vec = "[" + " ".join(f"{v:.3f}" for v in s["mean"]) + "]"
            row += f" {vec:<30} {s['spread']:>8.4f} {s['entropy_of_mean']:>8.3f}"
        lines.append(row)
    return "\n".join(lines)
