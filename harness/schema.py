"""The results file: its JSON schema, validation, and atomic reads and writes.

Results are read only as JSON (never pickle), so a results file from anywhere is safe to open.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_VERSION = 1
KIND = "zcbench-bench-results"
SCHEMA_PATH = Path(__file__).with_name("result.schema.json")


class ResultsError(ValueError):
    """A results file is missing, is not JSON, or does not follow the schema."""


@cache
def schema() -> dict[str, Any]:
    """The JSON schema of a results file (harness/result.schema.json)."""
    return json.loads(SCHEMA_PATH.read_text())


def validate(doc: Any, source: str = "results") -> None:
    """Raise ResultsError with the first schema violation's location, if any."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ResultsError(f"{source}: not a valid zcbench results file at {where}: {err.message}{more}")


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a results file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ResultsError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{p}: not JSON: {exc}") from exc
    validate(doc, str(p))
    return doc


def write_atomic(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    """Validate, then write through a temporary file and ``os.replace``: a kill never leaves half a file."""
    validate(doc, str(path))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
