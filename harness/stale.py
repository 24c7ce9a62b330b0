"""Whether a results file was measured by the current suite: same fingerprint, or stale.

The fingerprint (:func:`zcbench.suites.fingerprint.current`) hashes the check ids and the
suite code that probes and judges; a result measured by other code is stale, however
good its numbers look. Files from before fingerprints were recorded are stale too.
"""

from __future__ import annotations

from typing import Any


def current_fingerprint() -> str:
    """The fingerprint of the suite installed here."""
    from zcbench.suites import fingerprint

    return fingerprint.current()


def stale_reason(doc: dict[str, Any], current: str | None = None) -> str | None:
    """Why ``doc`` is stale, or None when its fingerprint is the current one."""
    current = current or current_fingerprint()
    recorded = doc.get("suite_fingerprint")
    if recorded is None:
        return f"no suite fingerprint recorded (made before fingerprints were; the current suite is {current})"
    if recorded != current:
        return f"measured with suite fingerprint {recorded}; the current suite is {current}"
    return None
