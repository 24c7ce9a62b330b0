"""Which models get the extra 'load with the code imported' measurement."""

from __future__ import annotations

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
