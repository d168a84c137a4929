"""Shared by tests, benchmarks and the fine-tuning lab: a private local TorchServe, handlers run
in-process with TorchServe's MockContext, traffic and bad-input generators, target discovery."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
