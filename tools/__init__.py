"""Benchmarks, the network simulator and plotting for dilo (see docs/results.md).

Every tool runs as `python tools/<name>.py ...` or `python -m tools.<name> ...` from the
repository root and writes JSON (and a PNG where a picture helps).
"""
