"""CPU speed knobs at the models' real sizes (the `realsize` weights set), in-process: part of
`make bench-real` (benchmarks/bench_real.py). The demo-size table is benchmarks/cpu_knobs.py's.

What is timed, with each model's cpu.yaml torch threads: sd15, one guided SD1.5 UNet call (batch 2,
64x64 latents = 512x512) and one 512x512 VAE decode; cam, ResNet-50 on 8 images at 224 px; ddpm,
the DDPM-CIFAR10 UNet on 8 images at 32 px. Variants: fp32 (the baseline), bf16 autocast, bf16
weights (the module and its inputs in bfloat16: `dtype_cpu: bfloat16`), channels_last, and for
the UNets the attention implementation: PyTorch's scaled_dot_product_attention (diffusers'
default, the baseline), diffusers' classic AttnProcessor (softmax of an explicit score matrix)
and sliced attention (`attention_slicing: true`) for SD1.5's; ddpm and cam also TorchScript / int8 as their
configs use them. A speedup is fp32's time / the variant's, the median of per-round ratios of
alternating rounds; the error is max |output - fp32| / max |fp32|. torch.compile is measured only
at the small sizes (cpu_knobs.py): at SD1.5's size its compile would take most of the run.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

from benchmarks.cpu_knobs import SPEEDUP_TO_ADOPT, autocast, loaded, seconds, speedups
from handlers.cam.handler import CamHandler
from handlers.core.torchscript import FrozenUNet
from handlers.ddpm.handler import DdpmHandler
from harness import REPO

# A knob is adopted at >= SPEEDUP_TO_ADOPT with its error within this (bf16 rounds each value to 8
# significant bits, 0.4 %; the errors of a whole network stay within a few of those).
ERROR_BOUND = 0.02
# Rounds x calls per variant: the SD1.5 modules take seconds per call, the small models milliseconds.
SD15_ROUNDS, SD15_CALLS = 2, 1
SMALL_ROUNDS, SMALL_CALLS = 5, 3


def threads(model: str) -> int:
    return yaml.safe_load((REPO / "model_configs" / model / "cpu.yaml").read_text())["handler"]["threads"]


def compare(calls: dict, rounds: int, n: int) -> dict:
    with torch.inference_mode():
        speed, first = speedups(calls, rounds, n)
        baseline_s = seconds(calls["baseline"], n)
        reference = calls["baseline"]().float()
        error = {k: round(float((f().float() - reference).abs().max() / reference.abs().max()), 5)
                 for k, f in calls.items()}
    return {"speedup": speed, "quality": error, "baseline_s": round(baseline_s, 4),
            "first_call_s": {k: round(v, 2) for k, v in first.items()}}


def float_variants(module: torch.nn.Module, call, *inputs: torch.Tensor) -> dict:
    """baseline, bf16 autocast, bf16 weights, channels_last of `call(module, *inputs)`."""
    bf16 = copy.deepcopy(module).to(torch.bfloat16)
    last = copy.deepcopy(module).to(memory_format=torch.channels_last)
    bf16_in = [x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs]
    last_in = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs]
    return {"baseline": lambda: call(module, *inputs),
            "bf16_autocast": autocast(lambda: call(module, *inputs)),
            "bf16_weights": lambda: call(bf16, *bf16_in),
            "channels_last": lambda: call(last, *last_in)}


def attention_variants(unet, call, *inputs) -> dict:
    """The UNet with diffusers' classic attention and with sliced attention, restored after each call."""
    from diffusers.models.attention_processor import AttnProcessor

    default = unet.attn_processors

    def using(set_up):
        def run():
            set_up()
            try:
                return call(unet, *inputs)
            finally:
                unet.set_attn_processor(dict(default))  # diffusers empties the dict it is given
        return run
    return {"attention_classic": using(lambda: unet.set_attn_processor(AttnProcessor())),
            "attention_sliced": using(lambda: unet.set_attention_slice("auto"))}


def sd15(root: Path) -> tuple[dict, dict]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.set_num_threads(threads("sd15"))
    gen = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(root / "sd15", subfolder="unet").eval()
    latents = torch.randn((2, 4, 64, 64), generator=gen)
    text = torch.randn((2, 77, unet.config.cross_attention_dim), generator=gen)
    t = torch.tensor(500)
    step = lambda u, x, tt, c: u(x, tt, c).sample  # noqa: E731
    calls = {**float_variants(unet, step, latents, t, text), **attention_variants(unet, step, latents, t, text)}
    unet_result = compare(calls, SD15_ROUNDS, SD15_CALLS)
    del calls
    vae = AutoencoderKL.from_pretrained(root / "sd15", subfolder="vae").eval()
    z = torch.randn((1, 4, 64, 64), generator=gen)
    decode = lambda v, x: v.decode(x).sample  # noqa: E731
    vae_result = compare(float_variants(vae, decode, z), SD15_ROUNDS, SD15_CALLS)
    return unet_result, vae_result


def cam(root: Path) -> dict:
    torch.set_num_threads(threads("cam"))
    net = loaded(CamHandler, "cam", root / "cam", quantize=None).model.net.eval()
    int8 = loaded(CamHandler, "cam", root / "cam").model  # cpu.yaml's int8, calibrated at load
    x = torch.randn((8, 3, 224, 224), generator=torch.Generator().manual_seed(0))
    calls = float_variants(net, lambda n, i: n(i), x)
    calls[f"int8_{torch.backends.quantized.engine}"] = lambda: int8.features_and_logits(x)[1]
    return compare(calls, SMALL_ROUNDS, SMALL_CALLS)


def ddpm(root: Path) -> dict:
    torch.set_num_threads(threads("ddpm"))
    handler = loaded(DdpmHandler, "ddpm", root / "ddpm", torchscript=False, unet_dtype_cpu=None)  # the fp32 baseline
    unet = handler.model.unet.eval()
    x = torch.randn((8, *handler.model.shape), generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 500)
    step = lambda u, xx, tt: u(xx, tt).sample  # noqa: E731
    calls = float_variants(unet, step, x, t)  # UNet2DModel has no attention-processor API
    frozen = FrozenUNet(unet, x)
    calls["torchscript"] = lambda: frozen(x, t)
    return compare(calls, SMALL_ROUNDS, SMALL_CALLS)


def measure(root: Path) -> dict:
    unet, vae = sd15(root)
    return {"sd15_unet": unet, "sd15_vae": vae, "cam": cam(root), "ddpm": ddpm(root),
            "threads": {m: threads(m) for m in ("sd15", "cam", "ddpm")},
            "rounds": {"sd15": [SD15_ROUNDS, SD15_CALLS], "small": [SMALL_ROUNDS, SMALL_CALLS]}}


def meets(name: str, speedup: float, error: float) -> bool:
    bound = 0.05 if name.startswith("int8") else ERROR_BOUND  # int8 cam: its contract (docs/targets.md)
    return name != "baseline" and speedup >= SPEEDUP_TO_ADOPT and error <= bound


def report(k: dict) -> list[str]:
    lines = ["## CPU knobs at real size", "",
             f"In-process, torch threads as each cpu.yaml ({', '.join(f'{m} {n}' for m, n in k['threads'].items())}); "
             f"speedup = fp32 time / the variant's, median of {k['rounds']['sd15'][0]} (sd15) or "
             f"{k['rounds']['small'][0]} alternating rounds; error = max |output - fp32| / max |fp32|. A knob meets "
             f"the bar at >= {SPEEDUP_TO_ADOPT}x with its error within {ERROR_BOUND} (int8 cam: within its contract). "
             "See benchmarks/real_knobs.py for what each call is.", ""]
    for name, title in (("sd15_unet", "SD1.5 UNet, one guided 512x512 step (batch 2)"),
                        ("sd15_vae", "SD1.5 VAE, one 512x512 decode"),
                        ("cam", "cam: ResNet-50, 8 images at 224 px"),
                        ("ddpm", "ddpm: DDPM-CIFAR10 UNet, 8 images at 32 px")):
        r = k[name]
        lines += [f"### {title}", "", "| variant | speedup | error vs fp32 | first call (s) | meets the bar |",
                  "|---|---|---|---|---|"]
        for variant, s in r["speedup"].items():
            q = r["quality"][variant]
            lines.append(f"| {variant} | {s} | {q} | {r['first_call_s'][variant]} | "
                         f"{'yes' if meets(variant, s, q) else 'no'} |")
        lines.append("")
    return lines
