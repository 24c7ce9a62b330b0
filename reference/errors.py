"""Errors raised by the reference ModelWrapper; each message names what is wrong."""

from __future__ import annotations


class ZeroCopyError(Exception):
    """Base class of every error the reference raises on purpose."""


class NoModulesError(ZeroCopyError, TypeError):
    """The object given to ``from_model`` holds no ``torch.nn.Module`` anywhere."""


class UnknownModeError(ZeroCopyError, ValueError):
    """``mode`` is neither ``"actor"`` nor ``"task"``."""


class UnsupportedTensorError(ZeroCopyError, TypeError):
    """A tensor cannot be shared exactly (sparse, quantized, meta, nested, subclass, ...)."""


class UnpicklableAttributeError(ZeroCopyError, TypeError):
    """Part of the model's skeleton (everything except tensor bytes) cannot be pickled."""


class DeviceUnavailableError(ZeroCopyError, RuntimeError):
    """``load`` was asked for a device this process does not have."""


class IsolationUnavailableError(ZeroCopyError, RuntimeError):
    """Copy-on-write isolation was required but no mechanism for it works in this process."""


class ModelLostError(ZeroCopyError, RuntimeError):
    """The shared weights are no longer in the object store (their owner died or freed them)."""


class StoreCapacityError(ZeroCopyError, RuntimeError):
    """The model's weights are larger than the object store of the node that would hold them."""
