"""Shared test fixtures: synthetic caches (used by the tests and the benchmarks)."""
