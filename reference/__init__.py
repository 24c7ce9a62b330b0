"""Reference implementation of zero-copy model sharing in Ray.

Self-contained (it needs only torch, numpy and ray): copy this folder into your project
if you like. Usage::

    wrapper = ModelWrapper.from_model(model_or_pipeline, mode="actor")   # driver
    model = wrapper.load()                                               # in each actor
"""

from .errors import (
    DeviceUnavailableError,
    IsolationUnavailableError,
    ModelLostError,
    NoModulesError,
    StoreCapacityError,
    UnknownModeError,
    UnpicklableAttributeError,
    UnsupportedTensorError,
    ZeroCopyError,
)
from .task_mode import TaskModel
from .wrapper import ModelWrapper, WrapperInfo

__version__ = "0.2.0"

__all__ = [
    "DeviceUnavailableError",
    "IsolationUnavailableError",
    "ModelLostError",
    "ModelWrapper",
    "NoModulesError",
    "StoreCapacityError",
    "TaskModel",
    "UnknownModeError",
    "UnpicklableAttributeError",
    "UnsupportedTensorError",
    "WrapperInfo",
    "ZeroCopyError",
]
