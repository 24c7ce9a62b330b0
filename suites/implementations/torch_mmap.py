"""Adapter for the file-based alternative: a ``torch.save`` checkpoint loaded with ``mmap=True``.

No Ray object store at all: ``wrap`` writes every tensor to a local checkpoint file and
keeps a weightless skeleton (the model with its tensors on the meta device); ``load``
maps the file (``torch.load(mmap=True, weights_only=True)``, ``MAP_PRIVATE`` by default,
so a write copies the page for the writer only) and assigns the mapped tensors into the
skeleton. Actors on one node share the file's page cache, not object-store pages, so
probes that look for the bytes inside the object store find none there. The file
lives on the driver's node only: ``multi_node`` is False.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from ray import cloudpickle

from ..contract import Capabilities
from ..probes import modules_of


@dataclass(frozen=True)
class Checkpoint:
    """What travels to actors: the checkpoint's path and the pickled weightless skeleton."""

    path: str
    skeleton: bytes


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta


def _module_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent and tied ones included) by qualified name."""
    found = {}
    for prefix, module in modules_of(obj):
        dot = f"{prefix}." if prefix else ""
        for name, t in module.named_parameters(remove_duplicate=False):
            found[dot + name] = t
        for name, t in module.named_buffers(remove_duplicate=False):
            found[dot + name] = t
    return found


class TorchMmapImpl:
    """``torch.save`` once, ``torch.load(mmap=True)`` in every actor, weights assigned in place."""

    name = "torch-mmap"
    version = torch.__version__
    capabilities = Capabilities(cpu=True, cuda=False, task_mode=False, multi_node=False, write_policy="cow")

    def wrap(self, obj: Any, mode: str = "actor") -> Checkpoint:
        if mode != "actor":
            raise ValueError(f"torch-mmap has no {mode!r} mode; only 'actor'")
        tensors = _module_tensors(obj)
        # The memo makes deepcopy put a meta stand-in wherever a tensor is referenced, so
        # the skeleton holds no weights and tied tensors stay one object.
        memo = {}
        for t in tensors.values():
            memo.setdefault(id(t), _meta_like(t))
        skeleton = cloudpickle.dumps(copy.deepcopy(obj, memo))
        folder = tempfile.mkdtemp(prefix="zcbench-torch-mmap-")
        path = os.path.join(folder, "weights.pt")
        # The original objects are saved, so pickle's memo keeps tied tensors one object.
        torch.save(tensors, path)
        return Checkpoint(path, skeleton)

    def load(self, wrapped: Checkpoint, device: str = "cpu") -> Any:
        state = torch.load(wrapped.path, mmap=True, weights_only=True)
        obj = cloudpickle.loads(wrapped.skeleton)
        for prefix, module in modules_of(obj):
            dot = f"{prefix}." if prefix else ""
            own = {k[len(dot) :]: v for k, v in state.items() if k.startswith(dot)}
            persistent = module.state_dict(keep_vars=True).keys()
            module.load_state_dict({k: own[k] for k in persistent}, strict=True, assign=True)
            # state_dict skips non-persistent buffers; assign them the same way.
            for name, _ in list(module.named_buffers(remove_duplicate=False)):
                if name not in persistent:
                    owner, _, leaf = name.rpartition(".")
                    module.get_submodule(owner)._buffers[leaf] = own[name]
        if torch.device(device).type != "cpu":
            for _, module in modules_of(obj):
                module.to(device)
        return obj

    def release(self, wrapped: Checkpoint) -> None:
        """Delete the checkpoint file and its folder."""
        shutil.rmtree(os.path.dirname(wrapped.path), ignore_errors=True)
