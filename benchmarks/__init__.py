"""Benchmarks: kernel micro-benchmarks now; service latency and throughput later. Results in ``results/``."""
