"""Benchmark harness: runs suites and benchmark matrices and writes reports."""
