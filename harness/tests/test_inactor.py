"""Which models get the extra 'load with the code imported' measurement."""

from __future__ import annotations

from torch import nn

from zcbench.harness import inactor


class Outside(nn.Module):  # a class of this test module, not of torch: like a transformers model
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)


def test_models_whose_classes_live_outside_torch_import_code_on_load():
    assert inactor.imports_model_code(Outside())
    assert not inactor.imports_model_code(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert not inactor.imports_model_code({"not": "a module"})
