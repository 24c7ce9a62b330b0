"""Result files: their JSON schemas, validation, and atomic reads and writes.

Two kinds: a benchmark results file (``result.schema.json``) and a conformance matrix
(``matrix.schema.json``). They are read only as JSON (never pickle), so a file from
anywhere is safe to open, and written through a temporary file so a kill never leaves
half a file; written files get the permissions of any other output (the umask's).
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_VERSION = 2
KIND = "zcbench-bench-results"
SCHEMA_PATHS = {"results": Path(__file__).with_name("result.schema.json"), "matrix": Path(__file__).with_name("matrix.schema.json")}
DESCRIPTIONS = {"results": "zcbench results file", "matrix": "zcbench conformance matrix"}


class ResultsError(ValueError):
    """A results file is missing, is not JSON, or does not follow the schema."""


@cache
def schema(kind: str = "results") -> dict[str, Any]:
    """The JSON schema of a results file (``results``) or a conformance matrix (``matrix``)."""
    return json.loads(SCHEMA_PATHS[kind].read_text())


def validate(doc: Any, source: str = "results", kind: str = "results") -> None:
    """Raise ResultsError with the first schema violation's location, if any."""
    validator = jsonschema.Draft202012Validator(schema(kind))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ResultsError(f"{source}: not a valid {DESCRIPTIONS[kind]} at {where}: {err.message}{more}")


def load(path: str | os.PathLike, kind: str = "results") -> dict[str, Any]:
    """Read and validate a results file (or, with ``kind="matrix"``, a conformance matrix)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ResultsError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{p}: not JSON: {exc}") from exc
    validate(doc, str(p), kind)
    return doc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` through a temporary file and ``os.replace``, with the umask's permissions (not mkstemp's 0600)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, doc: dict[str, Any], kind: str = "results") -> None:
    """Validate, then write atomically (see :func:`write_text_atomic`)."""
    validate(doc, str(path), kind)
    write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=False) + "\n")
