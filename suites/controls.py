"""The negative controls, as data: every check, the broken implementations it must fail, and how.

A check that has never failed on a broken implementation proves nothing. Each entry
names a mutant (:mod:`.mutants`) and a pattern its ``fail`` reason must match, so a
check that fails for an unrelated reason (or errors) does not count as caught.
``suites/tests/test_controls.py`` runs every control through the public executor in
real Ray actors; controls of checks that need a GPU run where there is one (the
prepared GPU check), and their decision functions are unit-tested everywhere.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from . import mutants


@dataclass(frozen=True)
class Control:
    """A mutant that the check must fail, with a pattern (regular expression) of the failure's reason."""

    mutant: str
    reason: str

    @property
    def spec(self) -> str:
        return MUTANTS[self.mutant]


#: Mutant name -> ``module:class`` spec (what workers import).
MUTANTS: dict[str, str] = {
    cls.name: f"{mutants.__name__}:{cls.__name__}"
    for _, cls in inspect.getmembers(mutants, inspect.isclass)
    if issubclass(cls, mutants.Mutant) and cls is not mutants.Mutant
}

_DIFFERS = r"not identical to the original model"

CONTROLS: dict[str, tuple[Control, ...]] = {
    "outputs.mixed_model": (Control("mutant-perturbs-weights", _DIFFERS),),
    "outputs.random_architectures": (Control("mutant-perturbs-weights", _DIFFERS),),
    "outputs.real.gpt2": (Control("mutant-perturbs-weights", _DIFFERS),),
    "outputs.real.bert": (Control("mutant-perturbs-weights", _DIFFERS),),
    "outputs.real.minilm_pretrained": (Control("mutant-perturbs-weights", _DIFFERS),),
    "outputs.real.from_pretrained": (Control("mutant-perturbs-weights", _DIFFERS),),
    "zero_copy.bytes_in_store": (Control("mutant-copies-on-load", r"outside it:"),),
    "zero_copy.second_actor_private_memory": (Control("mutant-copies-on-load", r"holds a private copy"),),
    "zero_copy.store_holds_one_copy": (
        Control("mutant-reputs-per-actor", r"more than one copy"),
        Control("mutant-file-backed-weights", r"the weights are not in the store"),
    ),
    "fidelity.dtypes": (Control("mutant-upcasts-bf16", r"t_bfloat16: dtype torch\.float32"),),
    "fidelity.random_tensors": (Control("mutant-corrupts-bytes", r"bytes differ"),),
    "fidelity.tied_weights": (Control("mutant-unties-weights", r"two objects after load"),),
    "fidelity.layout": (Control("mutant-loses-layout", r"stride"),),
    "fidelity.metadata": (
        Control("mutant-drops-buffer", r"buffers differ after load"),
        Control("mutant-plain-tensor-parameter", r"parameters differ after load"),
    ),
    "fidelity.autograd": (Control("mutant-inference-tensors", r"inference tensors after load"),),
    "isolation.classify_writes": (
        Control("mutant-writes-through", r"corrupts-others"),
        Control("mutant-raises-after-write", r"raise-after-write"),
    ),
    "isolation.declared_policy": (
        Control("mutant-writes-through", r"declared write_policy 'cow'"),
        Control("mutant-raises-after-write", r"declared write_policy 'raise'"),
    ),
    "lifetime.driver_drops_wrapper": (Control("mutant-forgets-object", r"after the driver dropped the wrapper"),),
    "lifetime.store_pressure": (Control("mutant-forgets-object", r"passed through a|loaded after store pressure"),),
    "lifetime.release_after_use": (Control("mutant-leaks-object", r"were not freed"),),
    "lifetime.repeated_cycles": (Control("mutant-leaks-per-load", r"actor_uss \+"),),
    "pipelines.containers": (Control("mutant-deepcopies-containers", r"two objects after load"),),
    "pipelines.methods": (Control("mutant-loses-methods", r"has no attribute 'encode'"),),
    "task_mode.outputs": (Control("mutant-task-mode-call-only", r"has no attribute 'embed'"),),
    "task_mode.zero_copy": (Control("mutant-task-mode-in-driver", r"ran in the driver process"),),
    "ray_data.end_to_end": (
        Control("mutant-copies-on-load", r"lie in the object store"),
        Control("mutant-perturbs-weights", r"differs from the original model"),
    ),
    "ray_data.image_classifier": (
        Control("mutant-copies-on-load", r"lie in the object store"),
        Control("mutant-perturbs-weights", r"by the original pipeline on the same batch"),
        Control("mutant-trains-batchnorm", r"BatchNorm layers are in training mode"),
    ),
    "ray_data.guide_patterns": (
        Control("mutant-copies-on-load", r"lie in the object store"),
        Control("mutant-perturbs-weights", r"differs from the original model"),
        Control("mutant-drops-last-row", r"were good rows"),
    ),
    "bad_input.no_modules": (Control("mutant-vague-errors", r"does not say the object holds no nn\.Module"),),
    "bad_input.unknown_mode": (Control("mutant-vague-errors", r"does not name 'bogus'"),),
    "bad_input.unpicklable_attribute": (Control("mutant-vague-errors", r"does not name 'zc_guard_lock'"),),
    "bad_input.unsupported_tensor": (Control("mutant-vague-errors", r"does not name 'zc_sparse_adjacency'"),),
    "bad_input.missing_device": (Control("mutant-vague-errors", r"does not name 'cuda:7'"),),
    "multi_node.one_copy_per_node": (Control("mutant-copies-on-load", r"outside its node's object store"),),
    "scale.many_tensors": (
        Control("mutant-quadratic-load", r"per-tensor cost grew"),
        Control("mutant-descriptor-per-tensor", r"more fds than"),
    ),
    "scale.pool_16_actors": (Control("mutant-copies-on-load", r"grew its private memory"),),
    "scale.near_capacity": (Control("mutant-ignores-capacity", r"disk-backed fallback file"),),
    "gpu.one_copy_per_gpu": (Control("mutant-copies-on-load", r"allocated their own copy|device memory grew"),),
    "gpu.outputs": (Control("mutant-perturbs-weights", r"values differ"),),
    "gpu.isolation": (Control("mutant-claims-cuda-cow", r"declared write_policy 'cow'"),),
    "gpu.owner_death": (Control("mutant-owned-by-first-actor", r"survivors failed"),),
}


def controls_of(check_id: str) -> tuple[Control, ...]:
    """The controls of a check (empty when it has none: a test fails on that)."""
    return CONTROLS.get(check_id, ())
