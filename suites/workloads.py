"""The seed guide's other Ray Data workloads, as written: the image classifier and the data-source patterns.

``image classifier``: the guide's complete example. A ``ImageClassifier`` pipeline holding a
ResNet-50 (transformers' architecture, random weights) is wrapped; image files this run
generates (PNG and JPEG) are read with ``ray.data.read_images``; each pool actor preprocesses
in ``__call__`` (resize 256, center-crop 224, normalise: torchvision's transforms, written
with Pillow and numpy because torchvision's wheel does not load here), runs the model,
takes the softmax, and returns the top-1 class and its confidence; ``write_parquet``.

``patterns``: CSV, JSON lines and ``from_items`` sources in one dataset, preprocessing as a
separate ``map_batches`` task, and the guide's error-handling pattern: the actor catches a
failing call and returns error rows instead of failing the job. Every row is accounted for:
exact outputs for the good rows, an error row for each bad one.

Both verify in the driver by re-running the original on the very same batches.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from . import hosts, probes
from .contract import Implementation, load_implementation
from .models import IMAGE_MEAN, IMAGE_STD
from .collector import collector
from .pipeline import MIN_STORED_BYTES, POOL_ACTOR_CPUS, batches_of, model_input, ray_data_settings, row_bytes

# ------------------------------------------------------------------------------ image classifier


class ImageClassifier:
    """The guide's pipeline: a classifier in eval mode called on a batch of preprocessed images."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(images).logits


def preprocess(image: np.ndarray, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize, on an HxWx3 uint8 image."""
    from PIL import Image

    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(resize, round(w * scale)), max(resize, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    arr = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGE_MEAN).view(3, 1, 1), torch.tensor(IMAGE_STD).view(3, 1, 1)
    return ((t - mean) / std).contiguous()


def classify(pipeline: Any, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class and confidence of each image, as the guide's actor computes them."""
    logits = pipeline(torch.stack([preprocess(i) for i in images]))
    probs = torch.softmax(logits, dim=1)
    return torch.argmax(probs, dim=1).numpy(), probs.max(dim=1).values.numpy()


class ImageActor:
    """The guide's ``InferenceActor``: loads the pipeline in ``__init__``, preprocesses and classifies in ``__call__``."""

    def __init__(self, impl_spec: str, wrapped_box: list, run: str, reports: Any):
        torch.set_num_threads(1)  # the driver's re-run uses one thread too: the same sums, the same bits
        impl = load_implementation(impl_spec)
        start = time.perf_counter()
        self.pipeline = impl.load(wrapped_box[0], "cpu")
        load_s = time.perf_counter() - start
        self.pid, self.calls = os.getpid(), 0
        norms = [m for _, root in probes.modules_of(self.pipeline) for m in root.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        ray.get(reports.add.remote(run, {
            "pid": self.pid, "load_s": load_s, "batchnorms": len(norms),
            "batchnorm_training": sum(m.training for m in norms),
            "residency": probes.residency(self.pipeline, MIN_STORED_BYTES).as_dict(),
        }))  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        top1, confidence = classify(self.pipeline, list(batch["image"]))
        n, call = len(top1), self.calls
        self.calls += 1
        return {
            "path": np.asarray(batch["path"], dtype=object),
            "class": top1.astype(np.int64),
            "confidence": confidence.astype(np.float32),
            "batch_key": np.array([f"{self.pid}-{call}"] * n, dtype=object),
            "pos": np.arange(n, dtype=np.int64),
        }


#: Image sizes written for the classifier: portrait, landscape, square, each as PNG and JPEG.
IMAGE_SIZES = ((320, 240), (240, 320), (256, 256), (300, 300))


def write_images(folder: Path, seed: int = 0) -> list[Path]:
    """Seeded images of :data:`IMAGE_SIZES`, each saved once as PNG and once as JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        # Smooth gradients plus noise: something a JPEG encoder has to work on.
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], axis=-1)
        pixels = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        for ext in ("png", "jpg"):
            path = folder / f"image-{i}.{ext}"
            Image.fromarray(pixels).save(path, quality=90) if ext == "jpg" else Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


def read_image(path: str) -> np.ndarray:
    """An image file as Ray Data's ``read_images(mode="RGB")`` gives it: HxWx3 uint8."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def run_image_classifier(impl: Implementation, wrapped: Any, folder: Path, *, pool: int, batch: int) -> tuple[Any, list[dict]]:
    """read_images -> map_batches(ImageActor, actor pool) -> write_parquet; the output table and the actors' reports."""
    import pyarrow.parquet as pq
    from ray.data import ActorPoolStrategy

    reports, run_id = collector(), uuid.uuid4().hex
    remote_args = {k: v for k, v in hosts.actor_options(impl.capabilities.worker_env).items() if k == "runtime_env"}
    dst = folder.parent / f"classified-{run_id[:8]}"
    try:
        with ray_data_settings():
            # One block per actor, so every actor of the pool gets images (and proves zero-copy there).
            ds = ray.data.read_images(str(folder), mode="RGB", include_paths=True, override_num_blocks=pool)
            results = ds.map_batches(
                ImageActor,
                fn_constructor_kwargs={"impl_spec": impl.spec, "wrapped_box": [wrapped], "run": run_id, "reports": reports},
                batch_size=batch,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=pool),
                num_cpus=POOL_ACTOR_CPUS,
                **remote_args,
            )
            results.write_parquet(str(dst))
        return pq.read_table(dst), ray.get(reports.take.remote(run_id))
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def verify_classified(table: Any, paths: list[Path], original: Any) -> dict[str, Any]:
    """Every image classified once; each batch's classes and confidences equal the original pipeline's, bit for bit."""
    got_paths = [os.path.basename(p) for p in table.column("path").to_pylist()]
    want = sorted(p.name for p in paths)
    assert sorted(got_paths) == want, f"ray_data: classified {sorted(got_paths)}, expected each of {want} once"
    cols = table.select(["batch_key", "pos", "path", "class", "confidence"]).to_pydict()
    grouped: dict[str, list] = {}
    for key, pos, path, cls, conf in zip(cols["batch_key"], cols["pos"], cols["path"], cols["class"], cols["confidence"]):
        grouped.setdefault(key, []).append((pos, path, cls, conf))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rows in grouped.values():
            rows.sort()
            top1, confidence = classify(original, [read_image(path) for _, path, _, _ in rows])
            for (_, path, cls, conf), want_cls, want_conf in zip(rows, top1, confidence):
                assert cls == want_cls and np.float32(conf).tobytes() == np.float32(want_conf).tobytes(), (
                    f"ray_data: {os.path.basename(path)} classified {cls} ({conf!r}) in the pool, "
                    f"{want_cls} ({want_conf!r}) by the original pipeline on the same batch"
                )
    finally:
        torch.set_num_threads(threads)
    return {"images": len(got_paths), "batches": len(grouped)}


# ------------------------------------------------------------------------------ data-source patterns

FEATURES = 32
#: Every row whose id is a multiple of this has an out-of-range category: its call fails.
BAD_EVERY = 13
BAD_CATEGORY = 99


def pattern_rows(start: int, count: int, seed: int) -> list[dict[str, Any]]:
    """Rows ``id, category, x0..x31`` (float32 values, exactly representable in text)."""
    rng = np.random.default_rng(seed)
    rows = []
    for rid in range(start, start + count):
        x = rng.standard_normal(FEATURES).astype(np.float32)
        category = BAD_CATEGORY if rid % BAD_EVERY == 0 else int(rng.integers(0, 16))
        rows.append({"id": rid, "category": category, **{f"x{i}": float(v) for i, v in enumerate(x)}})
    return rows


def write_pattern_sources(folder: Path, per_source: int = 48) -> tuple[list[dict], Path, Path, list[dict]]:
    """The rows, a CSV file and a JSON-lines file of two thirds of them, and the last third for ``from_items``."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    csv_rows = pattern_rows(0, per_source, seed=1)
    json_rows = pattern_rows(per_source, per_source, seed=2)
    item_rows = pattern_rows(2 * per_source, per_source, seed=3)
    csv_path, json_path = folder / "rows.csv", folder / "rows.jsonl"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()} for r in csv_rows)
    with open(json_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in json_rows)
    return csv_rows + json_rows + item_rows, csv_path, json_path, item_rows


def to_model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The separate preprocessing step (a plain ``map_batches`` task): columns -> a float32 feature matrix."""
    features = np.stack([np.asarray(batch[f"x{i}"], dtype=np.float64) for i in range(FEATURES)], axis=1)
    return {
        "id": np.asarray(batch["id"], dtype=np.int64),
        "category": np.asarray(batch["category"], dtype=np.int64),
        "features": features.astype(np.float32),
    }


class ErrorRowsActor:
    """The guide's error-handling actor: a failing call becomes error rows instead of a failed job.

    A batch that fails is retried row by row, so only the rows that fail are error rows.
    """

    def __init__(self, impl_spec: str, wrapped_box: list, run: str, reports: Any):
        torch.set_num_threads(1)
        self.model = load_implementation(impl_spec).load(wrapped_box[0], "cpu")
        self.pid, self.calls = os.getpid(), 0
        ray.get(reports.add.remote(run, {"pid": self.pid, "residency": probes.residency(self.model, MIN_STORED_BYTES).as_dict()}))

    def _forward(self, features: np.ndarray, category: np.ndarray) -> list[bytes]:
        with torch.no_grad():
            out = self.model(model_input(features), model_input(category))
        return row_bytes(out, len(features))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        key = f"{self.pid}-{self.calls}"
        self.calls += 1
        try:
            outputs, errors, keys = self._forward(batch["features"], batch["category"]), [""] * n, [key] * n
        except Exception:  # noqa: BLE001 - the guide's pattern: keep going, report the rows that fail
            outputs, errors, keys = [], [], []
            for i in range(n):
                try:
                    outputs += self._forward(batch["features"][i : i + 1], batch["category"][i : i + 1])
                    errors.append("")
                except Exception as exc:  # noqa: BLE001
                    outputs.append(b"")
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                keys.append(f"{key}-row{i}")
        return {
            "id": np.asarray(batch["id"], dtype=np.int64),
            "output": np.array(outputs, dtype=object),
            "error": np.array(errors, dtype=object),
            "batch_key": np.array(keys, dtype=object),
            "pos": np.arange(n, dtype=np.int64),
        }


def run_patterns(impl: Implementation, wrapped: Any, folder: Path, *, pool: int, batch: int) -> tuple[Any, list[dict], list[dict]]:
    """CSV + JSON + from_items -> map_batches(to_model_inputs) -> map_batches(ErrorRowsActor) -> write_parquet."""
    import pyarrow.parquet as pq
    from ray.data import ActorPoolStrategy

    rows, csv_path, json_path, items = write_pattern_sources(folder)
    reports, run_id = collector(), uuid.uuid4().hex
    remote_args = {k: v for k, v in hosts.actor_options(impl.capabilities.worker_env).items() if k == "runtime_env"}
    dst = folder / f"scored-{run_id[:8]}"
    try:
        with ray_data_settings():
            ds = ray.data.read_csv(str(csv_path)).union(ray.data.read_json(str(json_path)), ray.data.from_items(items))
            scored = ds.map_batches(to_model_inputs, batch_format="numpy").map_batches(
                ErrorRowsActor,
                fn_constructor_kwargs={"impl_spec": impl.spec, "wrapped_box": [wrapped], "run": run_id, "reports": reports},
                batch_size=batch,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=pool),
                num_cpus=POOL_ACTOR_CPUS,
                **remote_args,
            )
            scored.write_parquet(str(dst))
        return pq.read_table(dst), ray.get(reports.take.remote(run_id)), rows
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def verify_patterns(table: Any, rows: list[dict], original: Any) -> dict[str, Any]:
    """Every row once; an error row exactly for each bad category; the good rows' outputs exact per batch."""
    by_id = {r["id"]: r for r in rows}
    ids = table.column("id").to_pylist()
    missing, dupes = sorted(set(by_id) - set(ids)), len(ids) - len(set(ids))
    assert not missing and not dupes, f"ray_data: {len(missing)} rows lost (first {missing[:5]}), {dupes} duplicated, of {len(by_id)}"
    errors = dict(zip(ids, table.column("error").to_pylist()))
    bad = {rid for rid, r in by_id.items() if r["category"] == BAD_CATEGORY}
    flagged = {rid for rid, e in errors.items() if e}
    assert flagged == bad, (
        f"ray_data: error rows {sorted(flagged - bad)[:5]} were good rows, bad rows {sorted(bad - flagged)[:5]} were not "
        f"flagged (first error: {next((e for e in errors.values() if e), '')[:120]})"
    )
    grouped = batches_of(table)
    checked = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for entries in grouped.values():
            good = [(rid, out) for _, rid, out in entries if not errors[rid]]
            if not good:
                continue
            batch = to_model_inputs({k: np.array([by_id[rid][k] for rid, _ in good]) for k in rows[0]})
            with torch.no_grad():
                want = row_bytes(original(model_input(batch["features"]), model_input(batch["category"])), len(good))
            for (rid, got), expected in zip(good, want):
                assert got == expected, f"ray_data: output of row {rid} differs from the original model's on the same batch"
                checked += 1
    finally:
        torch.set_num_threads(threads)
    return {"rows": len(ids), "error_rows": len(flagged), "exact_rows": checked}
