"""Benchmarks: ``ehrbridge bench SCENARIO`` (``bench/cli.py``), installed as ``ehrbridge.bench``."""
