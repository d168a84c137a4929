"""What cam promises between two answers for the same image (docs/targets.md, "cam precisions"),
declared once: the tests check it (tests/support/cam_contract.py) and the CPU-knob benchmark
judges a knob by it.

- Within a precision: a batch answers as each image alone within BATCH[precision] (probabilities
  and the coarse map); float32 also across architectures (x86 vs aarch64).
- Against float32's answer, another precision keeps the same top-1, probabilities within
  PROBABILITY[precision], and every coarse map (normalised to [0, 1]) correlated at least
  MAP_CORRELATION_MIN with float32's and within MAP_MAX_ABS of it.
"""
from __future__ import annotations

BATCH = {"float32": 1e-4, "bfloat16": 1e-4, "float16": 1e-4, "int8": 0.0}
PROBABILITY = {"bfloat16": 0.02, "float16": 0.005, "int8": 0.05}
MAP_CORRELATION_MIN = 0.98
MAP_MAX_ABS = 0.05
