"""Fuzzing ``ModelWrapper.from_model``'s input handling with odd modules and pipelines.

Each example builds an object graph from named ingredients (odd tensors, odd Python
objects, cycles, deep nesting) placed at random spots. ``from_model`` must either
succeed, and the driver-side ``load`` must then give back every tensor exactly
(dtype, shape, stride, offset, flags, bytes, sharing), or raise a ``ZeroCopyError``
whose message names an offending ingredient. Any other exception fails the test.
"""

from __future__ import annotations

import io
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from zcbench.reference import ModelWrapper, NoModulesError, UnpicklableAttributeError, UnsupportedTensorError, ZeroCopyError
from zcbench.reference.graph import walk

settings.register_profile(
    "zc-fuzz",
    max_examples=50,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


class Pipeline:
    """A plain (non-module) object holding parts of a pipeline in attributes."""


class OddTensor(torch.Tensor):
    """A tensor subclass: its behaviour may depend on Python code the reference cannot share."""


class RefusesPickle:
    def __reduce__(self):
        raise RuntimeError("this object refuses to be pickled")


def _gen():
    yield 1


@dataclass(frozen=True)
class Ingredient:
    """One thing to place in the object graph; ``error`` is the ZeroCopyError subclass it must cause."""

    make: Callable[[], Any]
    error: type[ZeroCopyError] | None = None
    tensor: bool = False  # may be registered as a buffer


def _q() -> torch.Tensor:
    return torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 0, torch.qint8)


def _nonleaf() -> torch.Tensor:
    return torch.randn(3, requires_grad=True) * 2


def _closure_dense() -> Callable[[], torch.Tensor]:
    t = torch.arange(6.0)
    return lambda: t * 2


def _closure_sparse() -> Callable[[], torch.Tensor]:
    t = torch.eye(3).to_sparse()
    return lambda: t


def _write_file() -> io.IOBase:
    return tempfile.TemporaryFile("w")  # noqa: SIM115 - closed when the graph dies


def _read_file() -> io.IOBase:
    f = tempfile.TemporaryFile("w+")  # noqa: SIM115
    f.write("config")
    f.seek(0)
    return f


def _views() -> list[torch.Tensor]:
    base = torch.randn(6, 8)
    return [base, base.t(), base[2:, 3:], base[:, 1], base.view(48)[5:17].view(3, 4)]


def _tied() -> nn.Module:
    enc = nn.Linear(8, 8)
    dec = nn.Linear(8, 8)
    dec.weight = enc.weight
    return nn.Sequential(enc, dec)


INGREDIENTS: dict[str, Ingredient] = {
    # Succeeds; must come back exactly.
    "f32": Ingredient(lambda: torch.randn(5, 7), tensor=True),
    "f64": Ingredient(lambda: torch.randn(3, dtype=torch.float64), tensor=True),
    "bf16": Ingredient(lambda: torch.randn(4, 4).to(torch.bfloat16), tensor=True),
    "f16": Ingredient(lambda: torch.randn(9).to(torch.float16), tensor=True),
    "f8": Ingredient(lambda: torch.randn(16).to(torch.float8_e4m3fn), tensor=True),
    "c64": Ingredient(lambda: torch.randn(3, dtype=torch.complex64), tensor=True),
    "i8": Ingredient(lambda: torch.randint(-100, 100, (7,), dtype=torch.int8), tensor=True),
    "u16": Ingredient(lambda: torch.arange(5).to(torch.uint16), tensor=True),
    "i64": Ingredient(lambda: torch.arange(11), tensor=True),
    "bool": Ingredient(lambda: torch.rand(13) > 0.5, tensor=True),
    "zero_size": Ingredient(lambda: torch.empty(0, 4), tensor=True),
    "zero_dim": Ingredient(lambda: torch.tensor(3.5), tensor=True),
    "transposed": Ingredient(lambda: torch.randn(4, 6).t(), tensor=True),
    "expanded": Ingredient(lambda: torch.randn(1, 5).expand(4, 5), tensor=True),
    "strided_slice": Ingredient(lambda: torch.randn(10, 10)[1::3, 2::2], tensor=True),
    "leaf_grad": Ingredient(lambda: torch.randn(4, requires_grad=True), tensor=True),
    "parameter": Ingredient(lambda: nn.Parameter(torch.randn(3, 3))),
    "views": Ingredient(_views),
    "linear": Ingredient(lambda: nn.Linear(16, 8)),
    "empty_module": Ingredient(nn.Module),
    "relu": Ingredient(nn.ReLU),
    "empty_sequential": Ingredient(nn.Sequential),
    "layernorm": Ingredient(lambda: nn.LayerNorm(6)),
    "tied": Ingredient(_tied),
    "lambda": Ingredient(lambda: (lambda x: x + 1)),
    "closure_dense": Ingredient(_closure_dense),
    "read_file": Ingredient(_read_file),
    "none": Ingredient(lambda: None),
    "text": Ingredient(lambda: "tokenizer config"),
    "empty_dict": Ingredient(dict),
    # Must raise the named ZeroCopyError naming the ingredient.
    "lock": Ingredient(threading.Lock, UnpicklableAttributeError),
    "generator": Ingredient(_gen, UnpicklableAttributeError),
    "write_file": Ingredient(_write_file, UnpicklableAttributeError),
    "refuses_pickle": Ingredient(RefusesPickle, UnpicklableAttributeError),
    "sparse_coo": Ingredient(lambda: torch.eye(4).to_sparse(), UnsupportedTensorError, tensor=True),
    "sparse_csr": Ingredient(lambda: torch.eye(4).to_sparse_csr(), UnsupportedTensorError, tensor=True),
    "quantized": Ingredient(_q, UnsupportedTensorError, tensor=True),
    "meta": Ingredient(lambda: torch.empty(3, 3, device="meta"), UnsupportedTensorError, tensor=True),
    "nested": Ingredient(
        lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]), UnsupportedTensorError, tensor=True
    ),
    "subclass": Ingredient(lambda: torch.randn(3).as_subclass(OddTensor), UnsupportedTensorError, tensor=True),
    "nonleaf": Ingredient(_nonleaf, UnsupportedTensorError, tensor=True),
    "conj": Ingredient(lambda: torch.randn(3, dtype=torch.complex64).conj(), UnsupportedTensorError, tensor=True),
    "lazy": Ingredient(lambda: nn.LazyLinear(4), UnsupportedTensorError),
    "bare_storage": Ingredient(lambda: torch.randn(4).untyped_storage(), UnsupportedTensorError),
    "closure_sparse": Ingredient(_closure_sparse, UnsupportedTensorError),
}

PLACES = ("attr", "buffer", "list", "dict", "tuple", "object", "submodule", "deep")


@dataclass
class Built:
    root: Any
    bad: dict[str, type[ZeroCopyError]]  # unique name -> expected error class
    has_module: bool


def _place(holder: nn.Module | Pipeline, name: str, value: Any, place: str, depth: int, tensor: bool) -> None:
    if place == "buffer" and isinstance(holder, nn.Module) and tensor:
        holder.register_buffer(name, value)
    elif place == "list":
        setattr(holder, name, [0, value, "x"])
    elif place == "dict":
        setattr(holder, f"d_{name}", {name: value, "n": 1})
    elif place == "tuple":
        setattr(holder, name, (value,))
    elif place == "object":
        inner = Pipeline()
        setattr(inner, name, value)
        setattr(holder, f"o_{name}", inner)
    elif place == "submodule" and isinstance(holder, nn.Module):
        sub = nn.Module()
        setattr(sub, name, value)
        holder.add_module(f"m_{name}", sub)
    elif place == "deep":
        value_box: Any = {name: value}
        for level in range(depth):
            value_box = [value_box] if level % 2 else {f"k{level}": value_box}
        setattr(holder, f"deep_{name}", value_box)
    else:
        setattr(holder, name, value)


@st.composite
def graphs(draw) -> Built:
    """An object graph with a module (or, sometimes, none) holding random ingredients."""
    root_kind = draw(st.sampled_from(["module", "module", "pipeline", "dict_pipeline", "no_module"]))
    picks = draw(
        st.lists(
            st.tuples(st.sampled_from(sorted(INGREDIENTS)), st.sampled_from(PLACES), st.integers(0, 40)),
            min_size=0,
            max_size=5,
        )
    )
    module = nn.Module() if root_kind != "no_module" else Pipeline()
    bad: dict[str, type[ZeroCopyError]] = {}
    has_module = root_kind != "no_module"
    for i, (key, place, depth) in enumerate(picks):
        ing = INGREDIENTS[key]
        name = f"{key}_{i}"
        value = ing.make()
        has_module |= isinstance(value, nn.Module)
        _place(module, name, value, place, depth, ing.tensor)
        if ing.error is not None:
            bad[name] = ing.error
    if draw(st.booleans()):
        module.itself = module  # a cycle through the root
    if root_kind == "pipeline":
        root = Pipeline()
        root.model = module
        root.cycle = [root]
        return Built(root, bad, has_module)
    if root_kind == "dict_pipeline":
        return Built({"encoder": module, "steps": (module, [module])}, bad, has_module)
    return Built(module, bad, has_module)


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    return {path: t for path, t in walk(obj) if isinstance(t, torch.Tensor)}


def _raw(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _describe(t: torch.Tensor) -> tuple:
    return (
        type(t).__name__,
        t.dtype,
        tuple(t.shape),
        t.stride(),
        t.storage_offset(),
        t.requires_grad,
        _raw(t),
    )


def _sharing(tensors: dict[str, torch.Tensor]) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for path, t in tensors.items():
        if t.untyped_storage().nbytes():
            groups.setdefault(t.untyped_storage().data_ptr(), set()).add(path)
    return {frozenset(g) for g in groups.values()}


def _assert_same_graph(original: Any, loaded: Any) -> None:
    want, got = _tensors(original), _tensors(loaded)
    assert set(got) == set(want), f"tensor paths differ: {set(want) ^ set(got)}"
    for path, t in want.items():
        assert _describe(got[path]) == _describe(t), f"{path} changed through wrap/load"
    assert _sharing(got) == _sharing(want), "storage sharing (tied weights, views) changed"


@settings(settings.get_profile("zc-fuzz"))
@given(built=graphs())
def test_from_model_succeeds_exactly_or_names_the_problem(ray_session, built: Built):
    try:
        wrapper = ModelWrapper.from_model(built.root)
    except ZeroCopyError as exc:
        message = str(exc)
        if not built.has_module:
            assert isinstance(exc, NoModulesError), f"expected NoModulesError, got {exc!r}"
            assert type(built.root).__qualname__ in message
            return
        assert built.bad, f"from_model refused a supported graph: {exc!r}"
        named = [n for n in built.bad if n in message]
        assert named, f"the message names none of {sorted(built.bad)}: {message}"
        assert any(isinstance(exc, built.bad[n]) for n in named), f"{type(exc).__name__} for {named}: {message}"
        return
    assert built.has_module, "from_model accepted a graph without any module"
    assert not built.bad, f"from_model accepted {sorted(built.bad)}"
    loaded = wrapper.load()
    _assert_same_graph(built.root, loaded)
    for path, fn in walk(built.root):
        if path.split(".")[-1].startswith("closure_dense"):
            twin = dict(walk(loaded))[path]
            assert torch.equal(twin(), fn()), f"{path}: the closure's tensor changed"


def test_deep_nesting_is_handled(ray_session):
    """Far deeper than any real model: a clear error or a faithful load, never a RecursionError."""
    module = nn.Linear(4, 4)
    box: Any = {"leaf": torch.randn(3)}
    for _ in range(3000):
        box = [box]
    module.deep = box
    try:
        wrapper = ModelWrapper.from_model(module)
    except ZeroCopyError as exc:
        assert "deep" in str(exc), str(exc)
        return
    _assert_same_graph(module, wrapper.load())


@pytest.mark.parametrize("key", sorted(k for k, v in INGREDIENTS.items() if v.error))
def test_each_bad_ingredient_alone(ray_session, key):
    """Every unsupported ingredient, directly on a module, gives its own error naming it."""
    module = nn.Linear(4, 4)
    ing = INGREDIENTS[key]
    setattr(module, f"bad_{key}", ing.make())
    with pytest.raises(ing.error, match=f"bad_{key}"):
        ModelWrapper.from_model(module)
