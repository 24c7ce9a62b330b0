"""What the benchmark runs inside actors: which models get the 'load with the code imported' measurement, and the
steady shared-vs-private comparison (which must see a cost when there is one)."""

from __future__ import annotations

import time

import torch
from torch import nn

from zcbench.harness import inactor
from zcbench.suites import models


class Outside(nn.Module):  # a class of this test module, not of torch: like a transformers model
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)


def test_models_whose_classes_live_outside_torch_import_code_on_load():
    assert inactor.imports_model_code(Outside())
    assert not inactor.imports_model_code(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert not inactor.imports_model_code({"not": "a module"})


def test_the_suites_own_models_need_no_import_a_pool_actor_has_not_done():
    # The pool actor imports zcbench's pipeline and model zoo before it loads: timing a second load would only
    # cost two fresh actors per round.
    mlp = models.build(models.blob_case(1))
    assert any(not type(m).__module__.startswith("torch.") for m in mlp.modules())
    assert not inactor.imports_model_code(mlp)


class SlowWhereLoaded(nn.Module):
    """Broken on purpose: its forward is 3 ms slower than that of its private copy (as shared weights would be if they cost)."""

    def __init__(self, delay: float = 0.003) -> None:
        super().__init__()
        self.lin, self.delay = nn.Linear(4, 4), delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.lin(x)

    def __deepcopy__(self, memo: dict) -> SlowWhereLoaded:
        copy = SlowWhereLoaded(delay=0.0)
        copy.load_state_dict(self.state_dict())
        return copy


def test_steady_vs_private_sees_a_cost_of_the_loaded_model():
    times = inactor.steady_vs_private(SlowWhereLoaded(), "forward", (torch.ones(2, 4),), reps=4)
    assert times["shared_s"] - times["private_s"] > 0.002, times
    same = inactor.steady_vs_private(SlowWhereLoaded(delay=0.0), "forward", (torch.ones(2, 4),), reps=4)
    assert abs(same["shared_s"] - same["private_s"]) < 0.002, same
