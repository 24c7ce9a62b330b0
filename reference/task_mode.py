"""Task mode: a driver-side callable whose calls run as Ray tasks that load zero-copy."""

from __future__ import annotations

from typing import Any

import ray


@ray.remote
def _call_loaded(wrapper_box: list, path: tuple[str, ...], method: str, args: tuple, kwargs: dict) -> Any:
    # The wrapper travels boxed so Ray hands the task the wrapper, not a resolved value.
    target = wrapper_box[0].load()
    for name in path:
        target = getattr(target, name)
    return getattr(target, method)(*args, **kwargs)


class TaskModel:
    """Stands in for the model in the driver; each call is one Ray task.

    ``model(x)`` and every public method of the model's class (``model.encode(x)``)
    run remotely in a task that loads the weights zero-copy from the object store;
    ``model.encoder`` is the same kind of stand-in for the top-level submodule
    ``encoder`` (``model.encoder(x)`` runs it in a task). ``task_options`` are Ray
    remote options for those tasks (``num_cpus``...).
    """

    def __init__(
        self,
        wrapper: Any,
        methods: tuple[str, ...],
        task_options: dict | None = None,
        submodules: tuple[tuple[str, tuple[str, ...]], ...] = (),
        path: tuple[str, ...] = (),
    ):
        self._wrapper = wrapper.as_actor_mode()
        self._methods = methods
        self._options = dict(task_options or {})
        self._submodules = dict(submodules)
        self._path = path

    def _remote(self, method: str, args: tuple, kwargs: dict) -> Any:
        task = _call_loaded.options(**self._options) if self._options else _call_loaded
        return ray.get(task.remote([self._wrapper], self._path, method, args, kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._remote("__call__", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # Attributes set in __init__ are found before this runs; "_..." names never reach the model.
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._submodules:
            return TaskModel(self._wrapper, self._submodules[name], self._options, (), (*self._path, name))
        if name not in self._methods:
            where = ".".join(("model", *self._path))
            raise AttributeError(
                f"task-mode {where} has no public method {name!r} and no submodule of that name; "
                f"methods: {', '.join(self._methods)}; submodules: {', '.join(self._submodules) or 'none'}"
            )

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._remote(name, args, kwargs)

        call.__name__ = name
        return call

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._methods) | set(self._submodules))

    def __repr__(self) -> str:
        return f"TaskModel({'.'.join((self._wrapper.info.name, *self._path))}, methods={list(self._methods)})"
