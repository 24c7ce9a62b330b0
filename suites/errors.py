"""Exceptions of the suite's own machinery (never the implementation's fault)."""

from __future__ import annotations


class InfrastructureError(RuntimeError):
    """The check could not run: Ray did not start, a probe actor never came up, our own wait timed out.

    The executor reports it as ``error`` (retried once on a fresh cluster), never as a failure
    of the implementation under test.
    """
