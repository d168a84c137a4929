"""Benchmarks (`make bench`): in-process vs. served throughput, latency and cost ratios; the
models' quality evaluators (`make quality`, eval_*.py). They write benchmarks/results/."""
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
