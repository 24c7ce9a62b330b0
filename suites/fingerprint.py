"""The suite's fingerprint: a hash of every check id and of the source that decides verdicts.

Results made by another fingerprint were judged by other checks or probes, so reports
mark them stale and the committed matrix must be regenerated when it changes.
Implementations' adapters, the negative controls and the tests do not count: they are
judged, not judging.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent
#: Parts of the suite that decide nothing about a verdict.
EXCLUDED = frozenset({"implementations", "tests", "mutants.py", "controls.py", "__pycache__"})


def source_files() -> list[Path]:
    """The suite's own Python files that can change a verdict, in a stable order."""
    return sorted(
        p for p in SUITE_DIR.rglob("*.py") if not (set(p.relative_to(SUITE_DIR).parts) & EXCLUDED)
    )


@cache
def current() -> str:
    """16 hex digits of sha256 over the sorted check ids and the files of :func:`source_files`."""
    from .registry import all_checks

    h = hashlib.sha256()
    for check_id in sorted(c.id for c in all_checks()):
        h.update(check_id.encode() + b"\n")
    for path in source_files():
        h.update(str(path.relative_to(SUITE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
