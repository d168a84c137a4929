"""Shared by tests, benchmarks and the fine-tuning lab (and nothing else imports it): a private local
TorchServe (also in KServe mode), handlers run in-process with TorchServe's MockContext, traffic and
bad-input generators, single-file SD1.5 checkpoint fixtures, the aarch64 userland."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
