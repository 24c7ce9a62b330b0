"""Conformance and benchmark suites for zero-copy model sharing, usable against any implementation."""
