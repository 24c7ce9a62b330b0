"""Ray Data, multi-node, GPU and scale checks: pass on the reference, fail on a copying impostor.

The impostor wraps exactly like the reference but clones every weight after loading, so
outputs stay right and only the zero-copy parts of the checks can catch it.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from zcbench.suites.checks import gpu, multi_node, ray_data, scale
from zcbench.suites.contract import load_implementation
from zcbench.suites.implementations.reference import ReferenceImpl
from zcbench.suites.registry import SkipCheck

MiB = 2**20


class CloningImpl(ReferenceImpl):
    """Claims zero-copy like the reference, but copies every weight out of the store after loading."""

    name = "cloning-impostor"
    # Workers (Ray Data's pool, probe subprocesses) must import this test module by its spec.
    capabilities = replace(ReferenceImpl.capabilities, worker_env={"PYTHONPATH": os.path.dirname(__file__)})

    def load(self, wrapped, device="cpu"):
        model = super().load(wrapped, device)
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.data = t.data.clone()
        return model


@pytest.fixture(scope="module")
def reference():
    return load_implementation("reference")


@pytest.fixture(scope="module")
def cloning():
    return load_implementation(f"{__name__}:CloningImpl")


# --- against the reference (real Ray) ---------------------------------------------------------


def test_ray_data_end_to_end_passes(ray_session, reference):
    observed = ray_data.check_ray_data_end_to_end(reference)
    assert observed["rows"] == ray_data.ROWS and observed["bytes_in_store_min"] == observed["bytes_total"] > 0


def test_multi_node_one_copy_passes(reference):
    observed = multi_node.check_one_copy_per_node(reference)
    assert 0.5 * observed["model_bytes"] < observed["node_b_store_growth"] <= 1.25 * observed["model_bytes"]


def test_many_tensors_passes(ray_session, reference):
    observed = scale.check_many_tensors(reference)
    assert observed["n5000"]["fds"] < 1024


def test_pool_16_actors_passes(ray_session, reference):
    observed = scale.check_pool_16_actors(reference)
    assert observed["max_uss_growth"] <= 8 * MiB


def test_near_capacity_passes(reference):
    observed = scale.check_near_capacity(reference)
    # The reference refuses before storing anything, naming both sizes (192 MiB model, 128 MiB store).
    assert observed["wrap_raised"].startswith("StoreCapacityError"), observed
    assert "192.2 MiB" in observed["wrap_raised"] and "128.0 MiB" in observed["wrap_raised"], observed


@pytest.mark.parametrize(
    "fn", [gpu.check_one_copy_per_gpu, gpu.check_gpu_outputs, gpu.check_gpu_isolation, gpu.check_gpu_owner_death]
)
def test_gpu_checks_skip_without_cuda(fn, reference):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU checks run for real in the conformance run")
    with pytest.raises(SkipCheck, match="no CUDA device"):
        fn(reference)


# --- against the copying impostor -----------------------------------------------------------------


def test_ray_data_catches_copies(ray_session, cloning):
    with pytest.raises(AssertionError, match="ray_data: in a Ray Data pool actor only 0 of"):
        ray_data.check_ray_data_end_to_end(cloning)


def test_multi_node_catches_copies(cloning):
    with pytest.raises(AssertionError, match="multi_node: actor 0 .* outside its node's object store"):
        multi_node.check_one_copy_per_node(cloning)


def test_pool_16_catches_copies(ray_session, cloning):
    with pytest.raises(AssertionError, match=r"scale: actor \d+ of 16 grew its private memory"):
        scale.check_pool_16_actors(cloning)


# --- decision logic with fabricated numbers ---------------------------------------------------------


def test_one_copy_accepts_a_single_owner_and_mappers():
    model = 256 * MiB
    assert gpu.decide_one_copy(model, int(1.05 * model), [model, 0, 0, 0]) is None
    assert gpu.decide_one_copy(model, int(1.1 * model), [0, 0, 0, 0]) is None  # owner outside the actors


def test_one_copy_rejects_copies_and_growth():
    model = 256 * MiB
    assert "4 of 4 actors allocated their own copy" in gpu.decide_one_copy(model, 4 * model, [model] * 4)
    assert "device memory grew by 512 MiB" in gpu.decide_one_copy(model, 2 * model, [0, 0, 0, 0])


def test_write_classification():
    assert gpu.classify_write(None, writer_changed=True, other_changed=True) == "shared"
    assert gpu.classify_write("RuntimeError: read-only", writer_changed=False, other_changed=False) == "raise"
    assert gpu.classify_write(None, writer_changed=True, other_changed=False) == "private"
    assert gpu.classify_write(None, writer_changed=False, other_changed=False) == "ignored"
    assert gpu.judge_write("cow", "private") is None
    assert gpu.judge_write("shared", "shared") is None
    assert "behaved as 'shared', declared write_policy 'cow'" in gpu.judge_write("cow", "shared")
    assert gpu.judge_write("unknown", "shared") is not None
    assert gpu.judge_write("raise", "private") is not None


def test_survivor_judgement():
    assert gpu.judge_survivors([None, None]) is None
    assert "2 of 2 survivors failed (actor 1: RayActorError" in gpu.judge_survivors(["RayActorError: died", "values differ"])


def _one_copy_report(grown_b: int, outside: int = 0) -> dict:
    model = 64 * MiB
    r = {"bytes_total": model, "bytes_in_store": model - outside, "outside": ["layers.0.weight"] if outside else []}
    return {
        "model_bytes": model, "node_a": "A", "node_b": "B", "actor_nodes": ["A", "B", "B"],
        "outputs_identical": [True] * 3, "residency": [r] * 3,
        "store_before": {"A": 0, "B": 0}, "store_after": {"A": model, "B": grown_b}, "wall_s": 1.0,
    }  # fmt: skip


def test_multi_node_judgement():
    assert multi_node.judge_one_copy(_one_copy_report(64 * MiB + 4096), zero_copy=True)["node_b_store_growth"]
    with pytest.raises(AssertionError, match="node B's object store grew by 2.00x"):
        multi_node.judge_one_copy(_one_copy_report(128 * MiB), zero_copy=True)
    with pytest.raises(AssertionError, match="outside its node's object store"):
        multi_node.judge_one_copy(_one_copy_report(64 * MiB, outside=MiB), zero_copy=True)
    multi_node.judge_one_copy(_one_copy_report(128 * MiB), zero_copy=False)  # copies are allowed when not claimed


def test_many_tensors_judgement():
    small, mid = {"fds": 40, "mappings": 300, "load_s": 0.1}, {"fds": 40, "mappings": 300, "load_s": 0.2}
    scale.judge_many(small, mid, {"fds": 41, "mappings": 310, "load_s": 1.5})
    with pytest.raises(AssertionError, match="opened 5000 more fds"):
        scale.judge_many(small, mid, {"fds": 5040, "mappings": 300, "load_s": 1.5})
    with pytest.raises(AssertionError, match="more mappings"):
        scale.judge_many(small, mid, {"fds": 40, "mappings": 5300, "load_s": 1.5})
    with pytest.raises(AssertionError, match="took 20.00 s"):
        scale.judge_many(small, mid, {"fds": 40, "mappings": 300, "load_s": 20.0})


def test_near_capacity_judgement():
    refused = {"wrap_raised": "ObjectStoreFullError: ...", "model_bytes": 1, "store_capacity": 1}
    assert scale.judge_near_capacity(refused, zero_copy=True)["wrap_raised"]
    wrong = {"wrap_raised": None, "load_raised": None, "outputs_identical": [True, False], "residency": []}
    with pytest.raises(AssertionError, match=r"actors \[1\] compute wrong outputs"):
        scale.judge_near_capacity(wrong, zero_copy=True)
    crashed = {"wrap_raised": None, "load_raised": "RayActorError: died"}
    with pytest.raises(AssertionError, match="then loading failed"):
        scale.judge_near_capacity(crashed, zero_copy=True)
    unrelated = {"wrap_raised": "TypeError: cannot pickle 'generator' object"}
    with pytest.raises(AssertionError, match="without naming the object store"):
        scale.judge_near_capacity(unrelated, zero_copy=True)
