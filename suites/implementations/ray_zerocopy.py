"""Adapter for the ``ray-zerocopy`` package (PyPI), IBM's zero-copy model loading extended for actors.

How it works (read from its 0.2.0 source): ``ModelWrapper.from_model`` deep-copies each
top-level ``nn.Module`` with its tensors set to None and ``ray.put``s the skeleton
together with every module's parameters and buffers as numpy arrays
(``torch.clone(t).detach().numpy()``). In an actor, ``load()`` re-registers each array
with ``torch.as_tensor`` under ``torch.inference_mode``: a writable view of the shared
store. In task mode, ``load()`` returns a shim whose calls run ``call_model`` as Ray
tasks that rebuild the model the same way.

Consequences measured here: bf16 tensors cannot be wrapped at all (numpy has no
bfloat16: ``TypeError``); tied weights are extracted per module, so they become two
copies; buffers come back persistent; writes reach every process.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch
from ray_zerocopy import ModelWrapper

from ..contract import Capabilities


class RayZeroCopyImpl:
    """``ray_zerocopy.ModelWrapper`` through the contract, in actor and task mode."""

    name = "ray-zerocopy"
    version = importlib.metadata.version("ray-zerocopy")
    capabilities = Capabilities(cpu=True, cuda=False, task_mode=True, zero_copy=True, write_policy="shared")

    def wrap(self, obj: Any, mode: str = "actor") -> ModelWrapper:
        return ModelWrapper.from_model(obj, mode=mode)

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        # The package loads on the CPU only and leaves placement to the caller.
        model = wrapped.load()
        if torch.device(device).type != "cpu":
            if not isinstance(model, torch.nn.Module):
                raise ValueError(f"ray-zerocopy loads on the CPU only; cannot place a {type(model).__name__}")
            model = model.to(device)
        return model

    def release(self, wrapped: ModelWrapper) -> None:
        """Nothing to do: the weights are freed when the wrapper's references are dropped."""
