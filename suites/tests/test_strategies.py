"""The strategies draw valid cases, the real models hold their ties, and the output checks pass and fail.

Workers rebuild the broken implementation below from its ``module:factory`` spec, so
this module must stay importable as ``zcbench.suites.tests.test_strategies``.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings

from zcbench.suites import models, strategies
from zcbench.suites.strategies import (
    LAYOUTS,
    MIN_STORAGE_BYTES,
    ODD_DTYPES,
    TensorHolder,
    build_random,
    case_from_recipe,
    fidelity_tensors,
    load_profile,
    make_tensor,
    model_nbytes,
    recipes,
    state_digest,
    storages_of,
    tensor_recipes,
)

MiB = 2**20
FEW = settings(load_profile("ci"), max_examples=6)


# --------------------------------------------------------------------------- profiles


def test_profiles(monkeypatch):
    monkeypatch.delenv("ZCBENCH_PROFILE", raising=False)
    ci = load_profile()
    assert ci.max_examples == 3 and ci.derandomize and ci.deadline is None
    monkeypatch.setenv("ZCBENCH_PROFILE", "zcbench-thorough")
    assert load_profile().max_examples == 25
    assert load_profile("ci").max_examples == 3
    with pytest.raises(KeyError, match="zcbench-ci"):
        load_profile("nope")


# --------------------------------------------------------------------------- random architectures


@FEW
@given(recipe=recipes())
def test_recipe_rebuilds_identically(recipe):
    case = case_from_recipe(recipe)
    clone = pickle.loads(pickle.dumps(case))  # what an actor or task receives
    first, second = case.build(), clone.build()
    assert state_digest(first) == state_digest(second)
    assert 1 * MiB <= model_nbytes(first) <= 32 * MiB
    torch.testing.assert_close(case.run(first), clone.run(second), rtol=0, atol=0)


def test_recipe_rebuilds_identically_in_another_process(ray_session):
    case = case_from_recipe(_fixed_recipe())
    remote = ray_session.remote(num_cpus=0.01)(strategies.case_digest)
    assert ray_session.get(remote.remote(case)) == state_digest(case.build())


def _fixed_recipe() -> strategies.Recipe:
    blocks = tuple(
        strategies.BlockSpec(kind, dtype, kind == "conv")
        for kind, dtype in (("conv", "bfloat16"), ("attention", "float32"), ("batchnorm", "float16"), ("embedding", "float32"))
    )
    return strategies.Recipe(
        seed=5, vocab=2048, dim=128, heads=2, seq=8, blocks=blocks, share_block=True, big_storages=True, pipeline=True
    )


@FEW
@given(recipe=recipes(big_storages=True, tie_head=True))
def test_flags_are_honoured(recipe):
    obj = build_random(recipe)
    net = obj.net if recipe.pipeline else obj
    small = {k: s.nbytes() for k, s in storages_of(obj).items() if s.nbytes() < MIN_STORAGE_BYTES}
    assert not small, f"storages under 100 KiB: {small}"
    assert net.head.weight is net.embed.weight
    assert len(net.blocks) == len(recipe.blocks) + recipe.share_block
    if recipe.share_block:
        assert net.blocks[0] is net.blocks[-1]
    if recipe.noncontiguous:
        assert not net.proj_t.is_contiguous()
    assert ("positions" in net.state_dict()) == recipe.persistent_buffer
    names = dict(net.named_buffers())
    assert ("scale" in names) == recipe.nonpersistent_buffer and "scale" not in net.state_dict()
    for spec, block in zip(recipe.blocks, net.blocks):
        assert next(block.parameters()).dtype == getattr(torch, spec.dtype)
        if spec.channels_last:
            w = block.layer.weight
            assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    if recipe.pipeline:
        assert obj.net is obj.by_name["net"] and isinstance(obj.post, tuple) and isinstance(obj.pre, list)


def test_pipeline_and_features_are_drawn():
    drawn: list[strategies.Recipe] = []

    @settings(load_profile("ci"), max_examples=60)
    @given(recipe=recipes())
    def collect(recipe):
        drawn.append(recipe)

    collect()
    kinds = {b.kind for r in drawn for b in r.blocks}
    dtypes = {b.dtype for r in drawn for b in r.blocks}
    assert kinds == set(strategies.BLOCK_KINDS) and dtypes == set(strategies.FLOAT_DTYPES)
    for flag in ("pipeline", "tie_head", "share_block", "big_storages", "noncontiguous"):
        assert {getattr(r, flag) for r in drawn} == {True, False}, flag


# --------------------------------------------------------------------------- odd tensors


@FEW
@given(specs=tensor_recipes(min_bytes=MIN_STORAGE_BYTES))
def test_tensor_recipes(specs):
    for spec in specs:
        t = make_tensor(spec)
        assert t.dtype == getattr(torch, spec.dtype)
        assert t.untyped_storage().nbytes() >= MIN_STORAGE_BYTES
        again = make_tensor(spec)
        assert t.contiguous().reshape(-1).view(torch.uint8).tolist() == again.contiguous().reshape(-1).view(torch.uint8).tolist()
        if spec.layout == "transposed":
            assert not t.is_contiguous() and t.t().is_contiguous()
        elif spec.layout == "sliced":
            assert t.storage_offset() > 0 and not t.is_contiguous()
        elif spec.layout == "channels_last":
            assert t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
        elif spec.layout == "expanded":
            assert 0 in t.stride()
        else:
            assert t.is_contiguous()


def test_fidelity_tensors_cover_every_dtype_and_layout():
    seen: set[tuple[str, str]] = set()

    @settings(load_profile("ci"), max_examples=80)
    @given(pairs=fidelity_tensors())
    def collect(pairs):
        for name, t in pairs:
            layout = next(layout for layout in LAYOUTS if name.endswith(layout))
            seen.add((str(t.dtype).removeprefix("torch."), layout))

    collect()
    assert {d for d, _ in seen} == set(ODD_DTYPES)
    assert {layout for _, layout in seen} == set(LAYOUTS)


@FEW
@given(holder=fidelity_tensors(as_module=True, min_bytes=MIN_STORAGE_BYTES))
def test_fidelity_holder(holder):
    assert isinstance(holder, TensorHolder)
    tensors = dict(holder.named_parameters()) | dict(holder.named_buffers())
    assert tensors and all(t.untyped_storage().nbytes() >= MIN_STORAGE_BYTES for t in tensors.values())
    assert set(holder()) == set(tensors)


# --------------------------------------------------------------------------- real models


def test_registry_names_every_model():
    assert models.get("gpt2-small-config") is models.GPT2
    assert models.get("mlp-8mib").name == "mlp-8mib" and models.get("tensors-50").name == "tensors-50"
    with pytest.raises(KeyError, match="bert-small-config"):
        models.get("gpt5")
    built = models.build(models.get("tensors-50"))
    assert built is not models.build(models.get("tensors-50"))  # each caller gets its own copy


@pytest.mark.parametrize("case", [models.GPT2, models.BERT], ids=lambda c: c.name)
def test_real_config_models_tie_and_are_deterministic(case):
    pytest.importorskip("transformers")
    model = case.build()
    facts = models.tie_facts(model)
    assert facts and all(facts.values()), facts
    assert 16 * MiB <= model_nbytes(model) <= 64 * MiB
    assert state_digest(model) == state_digest(case.build())
    assert model.config._attn_implementation == "eager"


def test_minilm_is_the_pretrained_model():
    pytest.importorskip(models.MINILM_PACKAGE)
    model = models.MINILM.build()
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    out = models.MINILM.run(model)
    ids, mask, _ = models.minilm_inputs()
    assert out.last_hidden_state.shape == (*ids.shape, 384) and (mask == 0).any()
    # Pretrained, not random: the weights are those of the shipped checkpoint.
    from safetensors.torch import load_file

    shipped = load_file(f"{models.minilm_path()}/model.safetensors")
    key = next(k for k in shipped if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.embeddings.word_embeddings.weight, shipped[key])
