"""Adapter for safetensors: the weights saved once to a local ``.safetensors`` file, mapped by every actor.

What Hugging Face users pick today. ``wrap`` writes every parameter and buffer with
``save_file`` and keeps a weightless skeleton (the model with its tensors on the meta
device, as torch-mmap does). safetensors refuses tensors that share memory, so ties
are deduplicated the way ``save_model`` does it: one name is written and the others
are recorded in the file's metadata as ``alias -> kept name``; on load every alias
gets the kept name's tensor, so a tie comes back as one object. The format stores
contiguous tensors only: strided layouts (channels_last, transposed) are made
contiguous and other views of one storage are saved as separate copies.

``load`` opens the file with ``safe_open`` (the default ``mmap`` backend) and assigns
the tensors into the skeleton. Measured inside Ray actors (64 MiB of float32, Ray 2.60,
torch 2.13, safetensors 0.8.0): load 6-8 ms; each tensor is its own storage inside one
``rw-p`` (``MAP_PRIVATE``) mapping of the file, so actors share the file's page cache
(later actors gain < 1 MiB USS by loading and running it; the first actor to touch
the pages is charged them in its USS, +63 MiB on its first forward, as no one else
maps them yet); the ``pread`` backend copies instead (+64 MiB USS per actor);
a write copies the page for the writer only (other actors, later actors and the file
keep the original). Nothing lies in the object store; the file lives on the driver's
node only.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import safetensors
import torch
from ray import cloudpickle
from safetensors.torch import save_file

from ..contract import Capabilities
from ..probes import modules_of
from ._pickling import naming_culprit
from .torch_mmap import _meta_like, _module_tensors


@dataclass(frozen=True)
class SafetensorsFile:
    """What travels to actors: the file's path and the pickled weightless skeleton."""

    path: str
    skeleton: bytes


def _to_save(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write (ties once, each its own contiguous storage) and the ``alias -> kept`` names."""
    kept: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if id(t) in kept:  # a tie: the same tensor object under another name
            aliases[name] = kept[id(t)]
            continue
        kept[id(t)] = name
        t = t.detach()
        if t.layout == torch.strided:  # others (sparse) go as they are: save_file names and refuses them
            ptr = t.untyped_storage().data_ptr()
            if not t.is_contiguous() or ptr in storages:
                t = t.clone(memory_format=torch.contiguous_format)
            storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out, aliases


def _assign(obj: Any, loaded: dict[str, torch.Tensor]) -> None:
    """Put the loaded tensors in place of the skeleton's meta stand-ins (a buffer stays a buffer, persistent or not)."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta) -> (meta, replacement): one object per tie
    for prefix, top in modules_of(obj):
        dot = f"{prefix}." if prefix else ""
        for mod_name, module in top.named_modules(remove_duplicate=False):
            mdot = f"{mod_name}." if mod_name else ""
            for slots in (module._parameters, module._buffers):
                for leaf, meta in slots.items():
                    if meta is None:
                        continue
                    if id(meta) not in done:
                        t = loaded[dot + mdot + leaf]
                        if isinstance(meta, torch.nn.Parameter):
                            t = torch.nn.Parameter(t, requires_grad=meta.requires_grad)
                        elif meta.requires_grad:
                            t.requires_grad_(True)
                        done[id(meta)] = (meta, t)
                    slots[leaf] = done[id(meta)][1]


def _skeleton(obj: Any, tensors: dict[str, torch.Tensor]) -> bytes:
    """``obj`` pickled with a meta stand-in wherever a tensor is referenced (ties stay one object)."""
    memo: dict[int, torch.Tensor] = {}
    for t in tensors.values():
        memo.setdefault(id(t), _meta_like(t))
    try:
        return cloudpickle.dumps(copy.deepcopy(obj, memo))
    except Exception as exc:
        raise naming_culprit(obj, exc) from exc


class SafetensorsImpl:
    """``save_file`` once, ``safe_open`` (mmap) in every actor, tensors assigned into a meta skeleton."""

    name = "safetensors"
    version = safetensors.__version__
    capabilities = Capabilities(cpu=True, cuda=False, task_mode=False, multi_node=False, write_policy="cow")

    def wrap(self, obj: Any, mode: str = "actor") -> SafetensorsFile:
        if mode != "actor":
            raise ValueError(f"safetensors has no {mode!r} mode; only 'actor'")
        if next(modules_of(obj), None) is None:
            raise ValueError(f"no nn.Module found in the {type(obj).__name__} to wrap")
        tensors = _module_tensors(obj)
        to_save, aliases = _to_save(tensors)
        folder = tempfile.mkdtemp(prefix="zcbench-safetensors-")
        path = os.path.join(folder, "model.safetensors")
        try:
            save_file(to_save, path, metadata=aliases)  # save_model records dropped ties the same way
            skeleton = _skeleton(obj, tensors)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return SafetensorsFile(path, skeleton)

    def load(self, wrapped: SafetensorsFile, device: str = "cpu") -> Any:
        if torch.device(device).type != "cpu":
            raise ValueError(f"safetensors adapter loads on the CPU only; cannot load onto {device!r}")
        with safetensors.safe_open(wrapped.path, framework="pt", device="cpu") as f:
            loaded = {name: f.get_tensor(name) for name in f.keys()}
            for alias, kept in (f.metadata() or {}).items():
                loaded[alias] = loaded[kept]
        obj = cloudpickle.loads(wrapped.skeleton)
        _assign(obj, loaded)
        return obj

    def release(self, wrapped: SafetensorsFile) -> None:
        """Delete the file and its folder (actors that mapped it keep their pages)."""
        shutil.rmtree(os.path.dirname(wrapped.path), ignore_errors=True)
