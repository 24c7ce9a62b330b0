"""Task mode: a driver-side callable whose calls run as Ray tasks that load zero-copy."""

from __future__ import annotations

from typing import Any

import ray


@ray.remote
def _call_loaded(wrapper_box: list, method: str, args: tuple, kwargs: dict) -> Any:
    # The wrapper travels boxed so Ray hands the task the wrapper, not a resolved value.
    model = wrapper_box[0].load()
    return getattr(model, method)(*args, **kwargs)


class TaskModel:
    """Stands in for the model in the driver; each call is one Ray task.

    ``model(x)`` and every public method of the model's class (``model.encode(x)``)
    run remotely in a task that loads the weights zero-copy from the object store.
    ``task_options`` are Ray remote options for those tasks (``num_cpus``...).
    """

    def __init__(self, wrapper: Any, methods: tuple[str, ...], task_options: dict | None = None):
        self._wrapper = wrapper.as_actor_mode()
        self._methods = methods
        self._options = dict(task_options or {})

    def _remote(self, method: str, args: tuple, kwargs: dict) -> Any:
        task = _call_loaded.options(**self._options) if self._options else _call_loaded
        return ray.get(task.remote([self._wrapper], method, args, kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._remote("__call__", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._methods:
            raise AttributeError(
                f"task-mode model has no public method {name!r}; available: {', '.join(self._methods)}"
            )

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._remote(name, args, kwargs)

        call.__name__ = name
        return call

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._methods))
