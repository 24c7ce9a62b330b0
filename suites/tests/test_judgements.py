"""The checks' decision functions on fabricated numbers: each boundary of each verdict, without Ray.

Real runs prove every check fails its control (test_controls.py); these pin the exact
rules, including those of the GPU checks, which only run where there is a GPU.
"""

from __future__ import annotations

import pytest

from zcbench.suites.checks import bad_input, gpu, lifetime, multi_node, ray_data, scale

MiB = 2**20


def test_one_copy_accepts_a_single_owner_and_mappers():
    model = 256 * MiB
    assert gpu.decide_one_copy(model, int(1.05 * model), [model, 0, 0, 0]) is None
    assert gpu.decide_one_copy(model, int(1.1 * model), [0, 0, 0, 0]) is None  # owner outside the actors


def test_one_copy_rejects_copies_and_growth():
    model = 256 * MiB
    assert "4 of 4 actors allocated their own copy" in gpu.decide_one_copy(model, 4 * model, [model] * 4)
    assert "device memory grew by 512 MiB" in gpu.decide_one_copy(model, 2 * model, [0, 0, 0, 0])
    # An owner process outside the actors brings one CUDA context: allowed once, not twice.
    context = 500 * MiB
    assert gpu.decide_one_copy(model, model + context, [0, 0, 0, 0], context_bytes=context) is None
    assert "one CUDA context" in gpu.decide_one_copy(model, model + 2 * context, [0, 0, 0, 0], context_bytes=context)


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
        "model_bytes": model, "node_a": "A", "node_b": "B", "actor_nodes": ["B", "B", "A"],
        "outputs_identical": [True] * 3, "residency": [r] * 3,
        "store_before": {"A": 0, "B": 0}, "store_after": {"A": model, "B": grown_b},
    }  # fmt: skip


def test_multi_node_judgement():
    assert multi_node.judge_one_copy(_one_copy_report(64 * MiB + 4096), zero_copy=True)["node_b_store_growth"]
    with pytest.raises(AssertionError, match="node B's object store grew by 2.00x"):
        multi_node.judge_one_copy(_one_copy_report(128 * MiB), zero_copy=True)
    with pytest.raises(AssertionError, match="grew by 0.00x"):
        multi_node.judge_one_copy(_one_copy_report(0), zero_copy=True)  # nothing reached node B's store
    with pytest.raises(AssertionError, match="outside its node's object store"):
        multi_node.judge_one_copy(_one_copy_report(64 * MiB, outside=MiB), zero_copy=True)
    multi_node.judge_one_copy(_one_copy_report(128 * MiB), zero_copy=False)  # copies are allowed when not claimed


def _many(t50: float, t500: float, t5000: float, fds: int = 0, mappings: int = 0) -> dict:
    return {
        50: {"load_s": t50, "fds": 0, "mappings": 0},
        500: {"load_s": t500, "fds": 0, "mappings": 0},
        5000: {"load_s": t5000, "fds": fds, "mappings": mappings},
    }


def test_many_tensors_judgement():
    scale.judge_many(_many(0.002, 0.010, 0.100))  # linear
    scale.judge_many(_many(0.002, 0.010, 0.290))  # 2.9x the per-tensor cost: still within the bound
    with pytest.raises(AssertionError, match="per-tensor cost grew 10.0x"):
        scale.judge_many(_many(0.002, 0.010, 1.000))  # quadratic
    with pytest.raises(AssertionError, match="opened 5000 more fds"):
        scale.judge_many(_many(0.002, 0.010, 0.100, fds=5000))
    with pytest.raises(AssertionError, match="more mappings"):
        scale.judge_many(_many(0.002, 0.010, 0.100, mappings=5000))


def test_near_capacity_judgement():
    ok = "StoreCapacityError: m has 192.2 MiB of weights but this node's object store holds 128.0 MiB"
    assert scale.judge_near_capacity({"wrap_raised": ok}, zero_copy=True, declares_fallback=False)["wrap_raised"] == ok
    for vague in ("RuntimeError: could not store the model", "TypeError: cannot pickle 'generator' object"):
        with pytest.raises(AssertionError, match="without saying the object store is too small"):
            scale.judge_near_capacity({"wrap_raised": vague}, zero_copy=True, declares_fallback=False)
    fallback = {"wrap_raised": None, "load_raised": None, "outputs_identical": [True, True],
                "backing": [{"/tmp/ray/session_x/plasmaAbc (deleted)": 192 * MiB}] * 2}  # fmt: skip
    with pytest.raises(AssertionError, match="disk-backed fallback file"):
        scale.judge_near_capacity(fallback, zero_copy=True, declares_fallback=False)
    scale.judge_near_capacity(fallback, zero_copy=True, declares_fallback=True)  # declared and documented
    private = {**fallback, "backing": [{"": 192 * MiB}] * 2}
    with pytest.raises(AssertionError, match="in private memory"):
        scale.judge_near_capacity(private, zero_copy=True, declares_fallback=False)
    scale.judge_near_capacity(private, zero_copy=False, declares_fallback=False)  # a copying implementation may
    wrong = {**fallback, "outputs_identical": [True, False]}
    with pytest.raises(AssertionError, match=r"actors \[1\] compute wrong outputs"):
        scale.judge_near_capacity(wrong, zero_copy=True, declares_fallback=True)
    with pytest.raises(AssertionError, match="then loading failed"):
        scale.judge_near_capacity({"wrap_raised": None, "load_raised": "RayActorError: died"}, zero_copy=True, declares_fallback=False)


def test_no_module_message_must_say_so():
    assert bad_input.says_no_module("NoModulesError: dict holds no torch.nn.Module in its attributes", "dict")
    assert bad_input.says_no_module("ValueError: Holder contains no modules to share", "Holder")
    assert not bad_input.says_no_module("RuntimeError: No module named 'x'", "dict")
    assert not bad_input.says_no_module("ModuleNotFoundError: No module named 'Holder'", "Holder")
    assert not bad_input.says_no_module("ValueError: the module is bad", "Holder")


def test_leak_bounds_catch_a_steady_megabyte_per_load():
    model = 16 * MiB
    for cycles in (15, 33):  # one judged segment, CI and thorough
        bounds = lifetime.leak_bounds(model, cycles)
        leak = {"driver_uss": 0, "actor_uss": cycles * MiB, "store": 0, "driver_fds": 0, "actor_fds": 0}
        with pytest.raises(AssertionError, match=r"actor_uss \+"):
            lifetime.judge_leaks(leak, bounds, cycles, "mlp-16mib")
        noise = {"driver_uss": 3 * MiB, "actor_uss": 2 * MiB, "store": 64 * 1024, "driver_fds": 2, "actor_fds": 1}
        lifetime.judge_leaks(noise, bounds, cycles, "mlp-16mib")
    with pytest.raises(AssertionError, match=r"actor_fds \+30"):
        lifetime.judge_leaks({**noise, "actor_fds": 30}, lifetime.leak_bounds(model, 30), 30, "mlp-16mib")


def _segments(actor_mib: list[list[float]]) -> list[list[dict[str, int]]]:
    return [[{"driver_uss": 100 * MiB, "actor_uss": int(v * MiB)} for v in seg] for seg in actor_mib]


def _judge(segments: list[list[dict[str, int]]]) -> None:
    growth = {**lifetime.steady_growth(segments, ("driver_uss", "actor_uss")), "store": 0, "driver_fds": 0, "actor_fds": 0}
    lifetime.judge_leaks(growth, lifetime.leak_bounds(16 * MiB, 15), 60, "mlp-16mib")


def test_memory_held_for_a_while_or_a_one_time_step_is_not_a_leak():
    """tensorizer's actor: readings swing by 4-12 MiB and its floor steps up by 20 MiB, partly in one segment,
    partly in the next, then settles; the floor does not keep rising."""
    _judge(_segments([[200, 204, 212, 200, 208], [201, 209, 200, 213, 205], [208, 200, 201, 212, 204], [200, 211, 203, 200, 209]]))
    for step_at in (1, 2, 3):  # +4.5 MiB, then +16 MiB in the segment after (when there is one)
        _judge(_segments([[200.0 + (4.5 if j >= step_at else 0) + (16 if j > step_at else 0) + (i % 2) * 6 for i in range(5)] for j in range(4)]))


def test_a_steady_leak_as_small_as_the_bound_fails():
    per_cycle = 0.3  # MiB: 4.5 MiB per segment of 15 cycles, just over the 4 MiB bound; read every 3 cycles
    readings = [[200.0 + per_cycle * (15 * j + 3 * (i + 1)) for i in range(5)] for j in range(4)]
    with pytest.raises(AssertionError, match=r"actor_uss \+4\.5 MiB"):
        _judge(_segments(readings))
    swinging = [[v + (6 if i % 2 else 0) for i, v in enumerate(seg)] for seg in readings]  # the leak under the swings
    with pytest.raises(AssertionError, match=r"actor_uss \+4\.5 MiB"):
        _judge(_segments(swinging))
    with pytest.raises(ValueError, match="at least 3 segments"):
        lifetime.steady_growth(_segments([[1.0], [], [2.0]]), ("actor_uss",))


def test_too_little_store_pressure_is_the_suites_error_not_a_failure(monkeypatch):
    """Our fill putting less than the store's capacity through it judges nothing: an error, never a fail."""
    from zcbench.suites import verdicts

    counters = iter([{"created": 100 * MiB, "spilled": 0}, {"created": 596 * MiB, "spilled": 0}])
    monkeypatch.setattr(lifetime, "_store_counters", lambda: next(counters))
    before = lifetime._store_counters()
    with pytest.raises(lifetime.InfrastructureError, match=r"only 496 MiB passed through the 512 MiB store") as info:
        lifetime._assert_pressure(before, 512 * MiB)
    assert verdicts.classify(info.value) == "error"
    counters = iter([{"created": 740 * MiB, "spilled": 64 * MiB}])
    monkeypatch.setattr(lifetime, "_store_counters", lambda: next(counters))
    assert lifetime._assert_pressure({"created": 100 * MiB, "spilled": 0}, 512 * MiB) == {"created": 640 * MiB, "spilled": 64 * MiB}


def test_fill_is_sized_from_the_capacity_alone(monkeypatch):
    """More than the capacity whatever the store already holds, so every free page gets reused."""
    import types

    puts = []
    fake = types.SimpleNamespace(put=lambda a: puts.append(a.nbytes) or a, get=lambda a: a)
    monkeypatch.setattr(lifetime, "ray", fake)
    monkeypatch.setattr(lifetime.probes, "store_bytes_by_node", lambda: {"head": 400 * MiB})  # a fuller store
    put = lifetime._fill_store(512 * MiB, chunk=16 * MiB)
    assert put == sum(puts) >= 1.25 * 512 * MiB


def test_ray_data_residency_judgement():
    full = {"bytes_total": 100, "bytes_in_store": 100, "outside": []}
    assert ray_data.judge_residency([{"residency": full}] * 2, zero_copy=True)["actors_loaded"] == 2
    short = {"bytes_total": 100, "bytes_in_store": 0, "outside": ["layers.0.weight"]}
    with pytest.raises(AssertionError, match="only 0 of 100 weight bytes"):
        ray_data.judge_residency([{"residency": full}, {"residency": short}], zero_copy=True)
    ray_data.judge_residency([{"residency": short}], zero_copy=False)
    with pytest.raises(AssertionError, match="no pool actor reported"):
        ray_data.judge_residency([], zero_copy=True)


def test_batch_inputs_give_the_same_bits_at_any_offset_into_a_block():
    """A batch that is a view at an unaligned offset (as Ray Data hands them out) computes what a fresh copy does."""
    import numpy as np
    import torch

    from zcbench.suites.pipeline import model_input

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 256)
    rows = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the pool actors and the driver's re-run
    try:
        with torch.no_grad():
            want = layer(model_input(rows.copy()))
            for offset in range(16):  # in floats: every alignment a slice of a block can have
                block = np.zeros(3 * 64 + 16, np.float32)
                view = block[offset : offset + 3 * 64].reshape(3, 64)
                view[:] = rows
                t = model_input(view)
                assert t.data_ptr() % 64 == 0 and t.is_contiguous()
                assert torch.equal(layer(t), want), f"offset {offset}"
    finally:
        torch.set_num_threads(threads)
