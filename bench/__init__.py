"""Benchmarks, one module per measurement: ``python -m bench.<name>`` (``make bench NAME=...``).

Each writes ``bench/results/<name>.json`` through :func:`bench.common.write_results`.
"""
