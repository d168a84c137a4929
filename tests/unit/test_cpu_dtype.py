"""The CPU dtype a config asks for is the one that runs, with a warning where the CPU has no bf16
instructions for bfloat16 (it still runs, slower than float32: docs/targets.md)."""
from __future__ import annotations

import logging

import torch

from handlers.core import precision
from handlers.core.model import select_device
from handlers.core.precision import cpu_has_bf16, unet_dtype

X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm {extra}\n"
CPU = torch.device("cpu")


def test_bf16_instructions_are_read_from_cpuinfo(tmp_path):
    cases = {X86.format(extra=""): False, X86.format(extra="avx512_bf16"): True, X86.format(extra="amx_bf16"): True,
             ARM.format(extra=""): False, ARM.format(extra="bf16 i8mm"): True}
    for i, (text, expected) in enumerate(cases.items()):
        (tmp_path / str(i)).write_text(text)
        assert cpu_has_bf16(str(tmp_path / str(i))) is expected, text
    assert cpu_has_bf16(str(tmp_path / "missing")) is True


def test_bfloat16_without_the_instructions_runs_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    threads = torch.get_num_threads()
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        assert select_device(None, {"dtype_cpu": "bfloat16", "threads": threads}) == (CPU, torch.bfloat16)
    assert "dtype_cpu: bfloat16 on a CPU without bf16 instructions" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        assert select_device(None, {"unet_dtype_cpu": "bfloat16", "threads": threads})[1] == torch.float32
        assert unet_dtype({"unet_dtype_cpu": "bfloat16"}, CPU, torch.float32) == torch.bfloat16
    assert caplog.text.count("unet_dtype_cpu: bfloat16 on a CPU") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        assert select_device(None, {"dtype_cpu": "float32", "threads": threads})[1] == torch.float32
        assert unet_dtype({"unet_dtype_cpu": None}, CPU, torch.float32) == torch.float32
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
        assert select_device(None, {"dtype_cpu": "bfloat16", "threads": threads})[1] == torch.bfloat16
        assert unet_dtype({"unet_dtype_cpu": "bfloat16"}, CPU, torch.float32) == torch.bfloat16
    assert caplog.text == ""
