"""Deployment: target discovery (model_configs/) and the KServe storage layout (`make kserve`).
Imports nothing of the project but handlers; harness, tests and benchmarks build on it."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
