"""Adapter for Ray's own zero-copy tensor path (``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1``).

Ray reads the variable once, when ``ray`` is imported, and only then registers a
cloudpickle reducer that sends CPU tensors as uint8 numpy views (out-of-band, so they
land in the object store and are read back in place). It must be set in *every*
process: the workers get it from ``capabilities.worker_env`` (the suite passes it as
``runtime_env``); the driver must have it before its first ``import ray``, which the
suite's runner arranges by starting the run in a subprocess with ``worker_env``
applied. ``wrap`` refuses to run in a driver without it, because the model would then
be pickled the ordinary (copying) way and the results would describe a misconfiguration.

Measured behaviour (Ray 2.60, torch 2.13): Parameters, bf16 and tied (same-object)
weights arrive zero-copy; non-contiguous and channels_last tensors are copied to a
contiguous layout before the put (strides lost); views of one storage are sent as
separate byte ranges (storage sharing lost); loaded tensors are writable views of the
shared store, so an in-place write is seen by every process.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from ..contract import Capabilities

ENV_VAR = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"


def driver_enabled() -> bool:
    """Whether this process imported ray with the zero-copy tensor reducer on."""
    from ray._private import ray_constants

    return bool(ray_constants.RAY_ENABLE_ZERO_COPY_TORCH_TENSORS)


class RayBuiltinImpl:
    """``ray.put(model)`` / ``ray.get(ref)`` with Ray's zero-copy torch tensor reducer."""

    name = "ray-builtin"
    version = ray.__version__
    capabilities = Capabilities(
        cpu=True,
        cuda=False,
        task_mode=False,
        zero_copy=True,
        write_policy="shared",  # Ray documents it as safe only for read-only tensors
        worker_env={ENV_VAR: "1"},
    )

    def wrap(self, obj: Any, mode: str = "actor") -> ray.ObjectRef:
        if mode != "actor":
            raise ValueError(f"ray-builtin has no {mode!r} mode; only 'actor'")
        if not driver_enabled():
            raise RuntimeError(
                f"{ENV_VAR}=1 was not set when this process imported ray, so ray.put would copy "
                "every tensor; start the driver with it in the environment"
            )
        return ray.put(obj)

    def load(self, wrapped: ray.ObjectRef, device: str = "cpu") -> Any:
        obj = ray.get(wrapped)
        if torch.device(device).type != "cpu" and isinstance(obj, torch.nn.Module):
            obj = obj.to(device)
        return obj

    def release(self, wrapped: ray.ObjectRef) -> None:
        """Nothing to do: the weights are freed when the last reference is dropped."""
