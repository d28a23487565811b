"""Benchmarks of pipecat-orpheus, one folder per part.

Run from the repository root: `python3 -m bench.<part>.<module> ...` (see bench/README.md).
"""
