"""Expected-failures files: which checks an implementation is known to fail, and why.

One check id or id prefix per line, then `` # `` and a mandatory reason::

    # naive copies every model: no zero-copy claims hold
    zero_copy.            # naive copies the model into every actor
    isolation.cow_write   # writes are private by construction, nothing to test

Blank lines and full-line ``#`` comments are allowed. A prefix matches every check id
that starts with it (``zero_copy.`` matches ``zero_copy.bytes_in_store``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

_LINE = re.compile(r"^(?P<id>[^\s#]+)(?:\s+#\s*(?P<reason>.*))?$")


class ExpectedFailuresError(ValueError):
    """The expected-failures file is malformed (the message names the line)."""


def parse(text: str, source: str = "<expected failures>") -> dict[str, str]:
    """Parse the file's text into ``{id or prefix: reason}``; raise on a line without a reason."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise ExpectedFailuresError(
                f"{source}:{number}: cannot read {line!r}; write 'CHECK_ID_OR_PREFIX # reason'"
            )
        check_id, reason = m["id"], (m["reason"] or "").strip()
        if not reason:
            raise ExpectedFailuresError(
                f"{source}:{number}: {check_id!r} has no reason; write '{check_id} # why it is expected to fail'"
            )
        if check_id in entries:
            raise ExpectedFailuresError(f"{source}:{number}: {check_id!r} is listed twice")
        entries[check_id] = reason
    return entries


def load(path: str | Path) -> dict[str, str]:
    """Read and parse an expected-failures file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ExpectedFailuresError(f"cannot read expected-failures file {path}: {exc.strerror or exc}") from exc
    return parse(text, str(path))


def coerce(expected: str | Path | Mapping[str, str] | None) -> dict[str, str]:
    """Accept a file path, an ``{id: reason}`` mapping or None; always return a mapping."""
    if expected is None:
        return {}
    if isinstance(expected, Mapping):
        empty = [k for k, v in expected.items() if not str(v).strip()]
        if empty:
            raise ExpectedFailuresError(f"expected failures without a reason: {', '.join(empty)}")
        return {str(k): str(v) for k, v in expected.items()}
    return load(expected)


def reason_for(check_id: str, expected: Mapping[str, str]) -> str | None:
    """The reason ``check_id`` is expected to fail (exact id first, else the longest prefix)."""
    if check_id in expected:
        return expected[check_id]
    prefixes = [p for p in expected if check_id.startswith(p)]
    return expected[max(prefixes, key=len)] if prefixes else None


def unmatched(expected: Mapping[str, str], check_ids: Iterable[str]) -> list[str]:
    """Entries that match no registered check (stale or misspelt)."""
    ids = list(check_ids)
    return [p for p in expected if not any(i.startswith(p) for i in ids)]


def select(check_ids: Iterable[str], patterns: Iterable[str] | None) -> list[str]:
    """The ids that equal or start with one of ``patterns`` (all ids when None)."""
    ids = list(check_ids)
    if patterns is None:
        return ids
    pats = list(patterns)
    return [i for i in ids if any(i.startswith(p) for p in pats)]
