"""A deploy model in torch eager behind the :class:`~lily_deploy.runtime.Runner` interface."""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np


class TorchRunner:
    """Runs a :class:`~lily_deploy.core.deploy.LilyDeployModel` (CPU or CUDA) on numpy or torch inputs."""

    output_names = ["logits"]

    def __init__(self, model, name: str = "torch", device: str = "cpu"):
        import torch

        self.model = model.eval()
        self.label = name
        self.cuda = device.startswith("cuda")
        self.device = torch.device(device)
        if self.cuda:
            self.model.to(self.device)
        self.backend = "torch-cuda" if self.cuda else "torch-cpu"
        self.input_names = list(model.input_names)
        self.output_names = list(getattr(model, "output_names", ["logits"]))  # QA: start_logits, end_logits

    @property
    def name(self) -> str:
        return self.label

    def _tensors(self, feeds: Mapping[str, object]) -> dict:
        import torch

        out = {}
        for n in self.input_names:
            if n not in feeds:
                continue
            v = feeds[n]
            t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
            out[n] = t.to(self.device) if self.cuda else t
        return out

    def infer(self, feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
        import torch

        tensors = self._tensors(feeds)
        with torch.inference_mode():
            if self.output_names == ["logits"]:
                return {"logits": self.model.logits(**tensors).float().cpu().numpy()}
            outputs = self.model.outputs(**tensors)
        out = {k: v.float().cpu().numpy() for k, v in outputs.items()}
        out["logits"] = np.stack([out[n] for n in self.output_names], -1)  # QA: [batch, sequence, 2], as logits()
        return out

    def bind(self, feeds: Mapping[str, object]) -> Callable[[], None]:
        import torch

        tensors = self._tensors(feeds)

        def call():
            with torch.inference_mode():
                self.model.logits(**tensors)
            if self.cuda:
                torch.cuda.synchronize()

        return call


def routing_drift(model, batches, trained: str, routing: str) -> tuple[float, float]:
    """How far a Lily model's torch logits move from ``trained`` to ``routing`` routing over ``batches``.

    Returns (max |d| of the logits, share of predictions -- per sample, or per token -- keeping
    their top-1 class); the model is left routed by ``routing``.
    """
    runner, diffs, kept = TorchRunner(model), [], []
    try:
        for batch in batches:
            model.set_routing(trained)
            before = runner.infer(batch)["logits"]
            model.set_routing(routing)
            after = runner.infer(batch)["logits"]
            diffs.append(float(np.abs(after - before).max()))
            kept.append((after.argmax(-1) == before.argmax(-1)).ravel())
    finally:
        model.set_routing(routing)
    return max(diffs), float(np.concatenate(kept).mean())
