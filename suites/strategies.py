"""Hypothesis strategies for the suites: random small architectures and odd tensors.

Every drawn case is described by a frozen *recipe* (plain data) and built by a
module-level function, so the same case can be pickled and rebuilt in another process
bit for bit. Two settings profiles are registered here: ``zcbench-ci`` and
``zcbench-thorough``; :func:`load_profile` picks one (``ZCBENCH_PROFILE``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from torch import nn

from .models import MiB, ModelCase

#: Ray inlines objects below ~100 KiB instead of storing them; zero-copy claims need more.
MIN_STORAGE_BYTES = 100 * 1024 + 1

# ---------------------------------------------------------------------------- profiles

_SUPPRESS = (HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example)

settings.register_profile(
    "zcbench-ci",
    max_examples=3,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=_SUPPRESS,
    # Each example starts Ray actors: a shrink pass would cost minutes for a CI run.
    phases=(Phase.explicit, Phase.generate),
    report_multiple_bugs=False,
    print_blob=True,
)
settings.register_profile(
    "zcbench-thorough",
    max_examples=25,
    deadline=None,
    suppress_health_check=_SUPPRESS,
    report_multiple_bugs=False,
    print_blob=True,
)

PROFILES = ("zcbench-ci", "zcbench-thorough")


def load_profile(name: str | None = None) -> settings:
    """The settings of profile ``name`` (else ``$ZCBENCH_PROFILE``, else CI); ``ci``/``thorough`` also work.

    Returns the settings instead of loading them globally, so a check's choice never
    leaks into other hypothesis tests in the same process.
    """
    chosen = name or os.environ.get("ZCBENCH_PROFILE") or "zcbench-ci"
    if not chosen.startswith("zcbench-"):
        chosen = f"zcbench-{chosen}"
    if chosen not in PROFILES:
        raise KeyError(f"unknown hypothesis profile {chosen!r}; known: {', '.join(PROFILES)}")
    return settings.get_profile(chosen)


# ---------------------------------------------------------------------------- recipes

BLOCK_KINDS = ("linear", "conv", "layernorm", "batchnorm", "attention", "embedding")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class BlockSpec:
    """One block of a random architecture: its layer kind, dtype and weight layout."""

    kind: str
    dtype: str = "float32"
    channels_last: bool = False


@dataclass(frozen=True)
class Recipe:
    """Everything needed to rebuild one random architecture deterministically."""

    seed: int
    vocab: int
    dim: int
    heads: int
    seq: int
    blocks: tuple[BlockSpec, ...]
    tie_head: bool = True
    share_block: bool = False  # the first block is used a second time at the end
    noncontiguous: bool = True  # a transposed parameter
    persistent_buffer: bool = True
    nonpersistent_buffer: bool = True
    big_storages: bool = False  # every storage over MIN_STORAGE_BYTES
    pipeline: bool = False  # wrap the module in a non-Module pipeline object

    @property
    def name(self) -> str:
        kinds = "-".join(f"{b.kind}:{b.dtype}{':cl' if b.channels_last else ''}" for b in self.blocks)
        flags = "".join(
            tag
            for tag, on in (
                ("T", self.tie_head),
                ("S", self.share_block),
                ("N", self.noncontiguous),
                ("B", self.big_storages),
                ("P", self.pipeline),
            )
            if on
        )
        return f"random-{self.seed}-v{self.vocab}d{self.dim}-{kinds}-{flags}"


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class Block(nn.Module):
    """Applies one layer in its own dtype and maps the result back to bounded float32.

    ``tanh`` keeps activations finite whatever the dtype: NaN never equals NaN, and an
    exact comparison must fail only on real differences.
    """

    def __init__(self, spec: BlockSpec, dim: int, heads: int, vocab: int):
        super().__init__()
        self.kind = spec.kind
        self.dtype = _dtype(spec.dtype)
        self.channels_last = spec.channels_last
        if spec.kind == "linear":
            self.layer = nn.Linear(dim, dim)
        elif spec.kind == "conv":
            # A (3, 1) kernel over the sequence: the activations are viewed as (B, C, T, 1).
            self.layer = nn.Conv2d(dim, dim, (3, 1), padding=(1, 0))
        elif spec.kind == "layernorm":
            self.layer = nn.LayerNorm(dim)
        elif spec.kind == "batchnorm":
            self.layer = nn.BatchNorm1d(dim)
        elif spec.kind == "attention":
            self.layer = nn.MultiheadAttention(dim, heads, batch_first=True)
        elif spec.kind == "embedding":
            # A second lookup table indexed by quantised activations (small, to bound the size).
            self.layer = nn.Embedding(min(vocab, 1024), dim)
        else:
            raise ValueError(f"unknown block kind {spec.kind!r}")
        self.layer.to(self.dtype)
        if spec.kind == "batchnorm":
            with torch.no_grad():  # non-trivial running stats, so eval-mode BN matters
                self.layer.running_mean.uniform_(-0.2, 0.2)
                self.layer.running_var.uniform_(0.8, 1.2)
        if spec.kind == "conv" and spec.channels_last:
            self.layer.to(memory_format=torch.channels_last)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.dtype)
        if self.kind == "conv":
            x = x.transpose(1, 2).unsqueeze(-1)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = self.layer(x).squeeze(-1).transpose(1, 2)
        elif self.kind == "batchnorm":
            y = self.layer(x.transpose(1, 2)).transpose(1, 2)
        elif self.kind == "attention":
            y = self.layer(x, x, x, need_weights=False)[0]
        elif self.kind == "embedding":
            idx = ((h[..., 0].float() + 1) * 0.5 * (self.layer.num_embeddings - 1)).long().clamp(0, self.layer.num_embeddings - 1)
            y = self.layer(idx)
        else:
            y = self.layer(x)
        return torch.tanh(y.float() + h)


class RandomNet(nn.Module):
    """Token embedding, a stack of :class:`Block` s, an optional transposed projection, a head."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        r = recipe
        self.embed = nn.Embedding(r.vocab, r.dim)
        self.position = nn.Embedding(r.seq, r.dim)
        blocks = [Block(spec, r.dim, r.heads, r.vocab) for spec in r.blocks]
        if r.share_block:
            blocks.append(blocks[0])  # the same module (and weights) used twice
        self.blocks = nn.ModuleList(blocks)
        self.proj_t = nn.Parameter(torch.randn(r.dim, r.dim).t() / r.dim**0.5) if r.noncontiguous else None
        self.head = nn.Linear(r.dim, r.vocab, bias=False)
        if r.tie_head:
            self.head.weight = self.embed.weight
        if r.persistent_buffer:
            self.register_buffer("positions", torch.arange(r.seq, dtype=torch.int64))
        else:
            self.positions = None
        if r.nonpersistent_buffer:
            self.register_buffer("scale", torch.linspace(0.5, 1.5, r.dim), persistent=False)
        else:
            self.scale = None

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        positions = self.positions if self.positions is not None else torch.arange(tokens.shape[1])
        h = torch.tanh(self.embed(tokens) + self.position(positions[: tokens.shape[1]]))
        for block in self.blocks:
            h = block(h)
        if self.scale is not None:
            h = h * self.scale
        if self.proj_t is not None:
            h = h @ self.proj_t
        return {"hidden": h, "logits": self.head(h)}


class Pipeline:
    """A non-Module object holding modules in an attribute, a list, a tuple and a dict.

    ``net`` is referenced twice (attribute and dict), so an implementation must keep
    one object, not two copies.
    """

    def __init__(self, net: nn.Module, dim: int, seed: int):
        torch.manual_seed(seed + 1)
        self.net = net
        self.pre = [nn.Identity()]
        self.post = (nn.Linear(dim, dim), nn.Tanh())
        self.by_name = {"net": net, "norm": nn.LayerNorm(dim)}
        self.label = f"pipeline-{seed}"
        for module in (*self.post, self.by_name["norm"]):
            module.eval()

    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.by_name["net"](self.pre[0](tokens))
        h = self.by_name["norm"](out["hidden"])
        for module in self.post:
            h = module(h)
        return {"net": out, "post": h, "same_net": self.net is self.by_name["net"]}


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` elements with no gaps or overlaps (any dim order)."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _pack_small_tensors(model: nn.Module, min_bytes: int) -> None:
    """Move every tensor smaller than ``min_bytes`` into a per-dtype arena storage.

    Each tensor becomes a view (own shape, stride and storage offset) of an arena of at
    least ``min_bytes``: every storage is then large enough to be stored, not inlined,
    and the model also gains many tensors sharing one storage.
    """
    small: dict[torch.dtype, list[tuple[nn.Module, str, torch.Tensor, bool]]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in table.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                if t.untyped_storage().nbytes() < min_bytes and _dense(t):
                    small.setdefault(t.dtype, []).append((module, name, t, is_param))
    with torch.no_grad():
        for dtype, entries in small.items():
            itemsize = torch.empty(0, dtype=dtype).element_size()
            total = sum(t.numel() for _, _, t, _ in entries)
            arena = torch.zeros(max(total, -(-min_bytes // itemsize)), dtype=dtype)
            offset = 0
            for module, name, t, is_param in entries:
                view = torch.as_strided(arena, t.shape, t.stride(), offset)
                view.copy_(t)
                offset += t.numel()
                if is_param:
                    t.data = view  # keeps the Parameter object, so ties survive
                else:
                    # Buffers can be shared between modules only by name lookup; re-point all.
                    for m in model.modules():
                        for bname, b in m._buffers.items():
                            if b is t:
                                m._buffers[bname] = view


def build_random(recipe: Recipe) -> Any:
    """Build the model (or pipeline) described by ``recipe``; the same recipe gives the same bytes."""
    torch.manual_seed(recipe.seed)
    net = RandomNet(recipe)
    if recipe.big_storages:
        _pack_small_tensors(net, MIN_STORAGE_BYTES)
    net.eval()
    if recipe.pipeline:
        pipe = Pipeline(net, recipe.dim, recipe.seed)
        if recipe.big_storages:
            for module in (*pipe.post, pipe.by_name["norm"]):
                _pack_small_tensors(module, MIN_STORAGE_BYTES)
        return pipe
    return net


def random_inputs(recipe: Recipe, batch: int = 2) -> tuple:
    """Token ids drawn from a generator seeded by the recipe."""
    g = torch.Generator().manual_seed(recipe.seed + 7)
    return (torch.randint(0, recipe.vocab, (batch, recipe.seq), generator=g),)


def case_from_recipe(recipe: Recipe) -> ModelCase:
    """A :class:`ModelCase` whose build and inputs are picklable partials over ``recipe``."""
    return ModelCase(recipe.name, partial(build_random, recipe), partial(random_inputs, recipe))


def modules_of(obj: Any) -> list[nn.Module]:
    """The distinct top-level modules of a model or of a :class:`Pipeline`."""
    if isinstance(obj, nn.Module):
        return [obj]
    found = [obj.net, *obj.pre, *obj.post, *obj.by_name.values()]
    unique: dict[int, nn.Module] = {id(m): m for m in found}
    return list(unique.values())


def storages_of(obj: Any) -> dict[int, torch.UntypedStorage]:
    """Every distinct storage under ``obj`` (parameters and buffers, persistent or not)."""
    out: dict[int, torch.UntypedStorage] = {}
    for module in modules_of(obj):
        for t in (*module.parameters(), *module.buffers()):
            s = t.untyped_storage()
            out[s.data_ptr()] = s
    return out


def model_nbytes(obj: Any) -> int:
    """Bytes of all distinct storages (what an implementation must share)."""
    return sum(s.nbytes() for s in storages_of(obj).values())


@st.composite
def recipes(
    draw: st.DrawFn,
    *,
    big_storages: bool | None = None,
    pipeline: bool | None = None,
    tie_head: bool | None = None,
) -> Recipe:
    """Random :class:`Recipe` s; a flag given as True/False is fixed, None lets it vary.

    Sizes keep the total between 1 and 32 MiB (the token table alone is at least 1 MiB).
    """
    dim = draw(st.sampled_from((128, 192, 256)))
    vocab = draw(st.sampled_from((2048, 4096, 8192)))
    blocks = draw(
        st.lists(
            st.builds(
                BlockSpec,
                kind=st.sampled_from(BLOCK_KINDS),
                dtype=st.sampled_from(FLOAT_DTYPES),
                channels_last=st.booleans(),
            ),
            min_size=1,
            max_size=5,
        )
    )
    # channels_last only means something for convolutions.
    blocks = tuple(BlockSpec(b.kind, b.dtype, b.channels_last and b.kind == "conv") for b in blocks)

    def flag(fixed: bool | None) -> bool:
        return draw(st.booleans()) if fixed is None else fixed

    return Recipe(
        seed=draw(st.integers(0, 2**16)),
        vocab=vocab,
        dim=dim,
        heads=draw(st.sampled_from((1, 2, 4))),
        seq=draw(st.sampled_from((8, 16, 24))),
        blocks=blocks,
        tie_head=flag(tie_head),
        share_block=draw(st.booleans()),
        noncontiguous=draw(st.booleans()),
        persistent_buffer=draw(st.booleans()),
        nonpersistent_buffer=draw(st.booleans()),
        big_storages=flag(big_storages),
        pipeline=flag(pipeline),
    )


def model_cases(
    *, big_storages: bool | None = None, pipeline: bool | None = None, tie_head: bool | None = None
) -> st.SearchStrategy[ModelCase]:
    """Random small architectures as picklable :class:`ModelCase` s (see :func:`recipes`)."""
    return recipes(big_storages=big_storages, pipeline=pipeline, tie_head=tie_head).map(case_from_recipe)


# ---------------------------------------------------------------------------- odd tensors

ODD_DTYPES = (
    "float8_e4m3fn",
    "float8_e5m2",
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "complex64",
    "float16",
    "bfloat16",
)
LAYOUTS = ("contiguous", "transposed", "sliced", "channels_last", "expanded")


@dataclass(frozen=True)
class TensorRecipe:
    """One tensor for fidelity checks: dtype, layout, size and the seed of its values."""

    name: str
    dtype: str
    layout: str
    rows: int
    cols: int
    seed: int


def _values(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g)).to(dtype)
    if dtype.is_floating_point:
        # float8 ranges are small: scale into range so values are not all saturated.
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 2) + 1
    return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)


def make_tensor(recipe: TensorRecipe) -> torch.Tensor:
    """Build the tensor ``recipe`` describes, with the layout it names.

    ``sliced`` has a non-zero storage offset and a row stride larger than its width;
    ``expanded`` has a stride of 0; ``channels_last`` is 4-D.
    """
    g = torch.Generator().manual_seed(recipe.seed)
    dtype = _dtype(recipe.dtype)
    r, c = recipe.rows, recipe.cols
    if recipe.layout == "contiguous":
        return _values(dtype, (r, c), g)
    if recipe.layout == "transposed":
        return _values(dtype, (c, r), g).t()
    if recipe.layout == "sliced":
        return _values(dtype, (r + 3, c + 5), g)[3:, 2 : 2 + c]
    if recipe.layout == "channels_last":
        return _values(dtype, (2, 4, r, c), g).contiguous(memory_format=torch.channels_last)
    if recipe.layout == "expanded":
        return _values(dtype, (1, c), g).expand(r, c)
    raise ValueError(f"unknown layout {recipe.layout!r}")


class TensorHolder(nn.Module):
    """A module holding fidelity tensors: float and complex ones as parameters, the rest as buffers.

    Odd buffers alternate persistent and non-persistent, so both paths are covered.
    """

    def __init__(self, recipes: tuple[TensorRecipe, ...]):
        super().__init__()
        for i, r in enumerate(recipes):
            t = make_tensor(r)
            if t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.complex64):
                self.register_parameter(r.name, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(r.name, t, persistent=i % 2 == 0)

    def forward(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in (*self.named_parameters(), *self.named_buffers())}


def build_holder(recipes: tuple[TensorRecipe, ...]) -> TensorHolder:
    """Picklable builder for :class:`TensorHolder`."""
    return TensorHolder(recipes)


@st.composite
def tensor_recipes(
    draw: st.DrawFn,
    *,
    min_bytes: int = 0,
    dtypes: tuple[str, ...] = ODD_DTYPES,
    layouts: tuple[str, ...] = LAYOUTS,
    max_size: int = 6,
) -> tuple[TensorRecipe, ...]:
    """A tuple of distinct-named :class:`TensorRecipe` s; ``min_bytes`` sizes each storage."""
    count = draw(st.integers(1, max_size))
    out = []
    for i in range(count):
        dtype = draw(st.sampled_from(dtypes))
        layout = draw(st.sampled_from(layouts))
        itemsize = torch.empty(0, dtype=_dtype(dtype)).element_size()
        cols = draw(st.sampled_from((8, 24, 64)))
        rows = draw(st.integers(3, 40))
        # The smallest storage is the expanded one: its single source row is all there is.
        per_row = cols * itemsize * (8 if layout == "channels_last" else 1)
        if layout == "expanded":
            cols = max(cols, -(-min_bytes // itemsize))
        else:
            rows = max(rows, -(-min_bytes // per_row))
        out.append(TensorRecipe(f"t{i}_{dtype}_{layout}", dtype, layout, rows, cols, draw(st.integers(0, 2**16))))
    return tuple(out)


def fidelity_tensors(
    *, min_bytes: int = 0, as_module: bool = False, **kwargs: Any
) -> st.SearchStrategy[list[tuple[str, torch.Tensor]]] | st.SearchStrategy[TensorHolder]:
    """Lists of ``(name, tensor)`` in odd dtypes and layouts, or (``as_module``) a :class:`TensorHolder`.

    ``min_bytes`` makes every tensor's storage at least that big; other keywords go to
    :func:`tensor_recipes` (``dtypes``, ``layouts``, ``max_size``).
    """
    specs = tensor_recipes(min_bytes=min_bytes, **kwargs)
    if as_module:
        return specs.map(build_holder)
    return specs.map(lambda rs: [(r.name, make_tensor(r)) for r in rs])


def holder_case(recipes: tuple[TensorRecipe, ...]) -> ModelCase:
    """A :class:`ModelCase` for a :class:`TensorHolder` (its call returns clones of every tensor)."""
    return ModelCase(f"tensors-{len(recipes)}", partial(build_holder, recipes), tuple)


__all__ = [
    "BlockSpec",
    "MIN_STORAGE_BYTES",
    "MiB",
    "Pipeline",
    "RandomNet",
    "Recipe",
    "TensorHolder",
    "TensorRecipe",
    "build_holder",
    "build_random",
    "case_digest",
    "state_digest",
    "case_from_recipe",
    "fidelity_tensors",
    "holder_case",
    "load_profile",
    "make_tensor",
    "model_cases",
    "model_nbytes",
    "recipes",
    "storages_of",
    "tensor_recipes",
]


def state_digest(obj: Any) -> str:
    """SHA-256 over every tensor (name, dtype, shape, stride, offset, bytes) of a model or pipeline.

    Non-persistent buffers are included; the same recipe must give the same digest in
    any process.
    """
    import hashlib

    h = hashlib.sha256()
    for i, module in enumerate(modules_of(obj)):
        for name, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)):
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}:{t.stride()}:{t.storage_offset()}".encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def case_digest(case: ModelCase) -> str:
    """:func:`state_digest` of a freshly built case (handy as a Ray task to rebuild elsewhere)."""
    return state_digest(case.build())
