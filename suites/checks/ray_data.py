"""Ray Data end to end: the seed guide's pattern (parquet in, ``map_batches`` with an actor pool, parquet out).

The model is loaded inside Ray Data's own pool actors (:mod:`..pipeline`), which report
where the loaded weights lie in those processes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .. import models, pipeline
from ..contract import release
from ..registry import SkipCheck, check

ROWS = 256
FILES = 8
BATCH = 32
POOL = 2
CASE = models.blob_case(16)


def judge_residency(reports: list[dict[str, Any]], zero_copy: bool) -> dict[str, Any]:
    """Every pool actor loaded, and (when zero-copy is claimed) holds every weight byte in the object store."""
    assert reports, "ray_data: no pool actor reported a load"
    res = [r["residency"] for r in reports]
    observed = {"actors_loaded": len(reports), "bytes_total": max(r["bytes_total"] for r in res),
                "bytes_in_store_min": min(r["bytes_in_store"] for r in res)}  # fmt: skip
    if zero_copy:
        assert observed["bytes_total"] > 0, "ray_data: the loaded model has no CPU tensor storage above 100 KiB to locate"
        short = [r for r in res if r["bytes_in_store"] < r["bytes_total"]]
        assert not short, (
            f"ray_data: in a Ray Data pool actor only {short[0]['bytes_in_store']} of {short[0]['bytes_total']} weight "
            f"bytes lie in the object store (outside: {', '.join(short[0]['outside'][:3])})"
        )
    return observed


@check("ray_data.end_to_end", hosts={})
def check_ray_data_end_to_end(impl) -> dict[str, Any]:
    """read_parquet -> map_batches(actor pool loading the wrapped model) -> write_parquet: every row once, exact, zero-copy."""
    original = models.build(CASE)
    wrapped = impl.wrap(original, "actor")
    try:
        with tempfile.TemporaryDirectory(prefix="zcbench-ray-data-") as tmp:
            data = pipeline.make_inputs(CASE, ROWS, seed=3, workdir=tmp, files=FILES)
            run = pipeline.run(impl, wrapped, data, pool=POOL, batch=BATCH, out_dir=tmp)
    finally:
        release(impl, wrapped)
    seen = pipeline.verify(run.table, data, original)
    return {**seen, **judge_residency(run.reports, impl.capabilities.zero_copy), "wall_s": run.wall_s}


@check("ray_data.image_classifier", hosts={})
def check_image_classifier(impl) -> dict[str, Any]:
    """The guide's image example as written: read_images -> ResNet-50 pipeline in an actor pool (preprocess,
    softmax, top-1) -> write_parquet: every image once, exact classes and confidences, BatchNorm in eval, zero-copy."""
    from .. import workloads

    missing = models.missing_requirements(models.RESNET50.name)
    if missing:
        raise SkipCheck(f"the image classifier needs {', '.join(missing)}, which cannot be imported here")
    original = workloads.ImageClassifier(models.build(models.RESNET50))
    wrapped = impl.wrap(original, "actor")
    try:
        with tempfile.TemporaryDirectory(prefix="zcbench-images-") as tmp:
            paths = workloads.write_images(Path(tmp) / "images")
            table, reports = workloads.run_image_classifier(impl, wrapped, Path(tmp) / "images", pool=POOL, batch=4)
            training = [r for r in reports if r["batchnorm_training"]]
            assert not training, (
                f"ray_data: {training[0]['batchnorm_training']} of {training[0]['batchnorms']} BatchNorm layers are in "
                "training mode after load (the original pipeline is in eval)"
            )
            seen = workloads.verify_classified(table, paths, original)
    finally:
        release(impl, wrapped)
    return {**seen, **judge_residency(reports, impl.capabilities.zero_copy)}


@check("ray_data.guide_patterns", hosts={})
def check_guide_patterns(impl) -> dict[str, Any]:
    """CSV + JSON + from_items sources, preprocessing as a separate map_batches, the guide's error-rows actor:
    every row accounted for (exact outputs, an error row for each failing row), zero-copy."""
    from .. import workloads

    original = models.build(models.TABULAR)
    wrapped = impl.wrap(original, "actor")
    try:
        with tempfile.TemporaryDirectory(prefix="zcbench-patterns-") as tmp:
            # One actor: sharing between pool actors is end_to_end's; this check is about the sources and rows.
            table, reports, rows = workloads.run_patterns(impl, wrapped, Path(tmp), pool=1, batch=16)
    finally:
        release(impl, wrapped)
    seen = workloads.verify_patterns(table, rows, original)
    return {**seen, **judge_residency(reports, impl.capabilities.zero_copy)}
