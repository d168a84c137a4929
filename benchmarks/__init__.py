"""Benchmarks (`make bench`): in-process vs. served throughput, latency and cost ratios."""
