"""The trained sd15 demo LoRAs (weights/demo/sd15/loras/, weights/train_sd15_lora.py) through plain
diffusers, without the handler (tests/unit/test_sd15_loras.py serves LoRAs): their judges are right
on rendered ground truth, each file is in the format it claims, loads with `load_lora_weights` +
`set_adapters` and teaches its trait."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from benchmarks import eval_sd15_quality as Q
from harness.inprocess import demo_weights
from weights import sd15_captions as C

FORMATS = {"rainbow": "diffusers", "italic": "kohya"}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lora_file(name: str) -> str:
    return str(demo_weights("sd15") / "loras" / f"{name}.safetensors")


@pytest.fixture(scope="module")
def pipe():
    """The demo pipeline with both LoRAs loaded as adapters named after their files."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(demo_weights("sd15")), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for name in FORMATS:
        pipe.load_lora_weights(lora_file(name), adapter_name=name)
    return pipe


def draw(pipe, prompts: list[str], adapters: dict[str, float], steps: int = 25) -> list:
    """One image per prompt (seeds 0..), the handler's defaults, with `adapters` at their weights."""
    if adapters:
        pipe.enable_lora()
        pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    else:
        pipe.disable_lora()
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, height=64, width=64,
                generator=generators).images


def test_trait_judges_on_rendered_ground_truth():
    for trait, res in Q.trait_judges_on_ground_truth(per_colour=20).items():
        assert res["trait"] >= 0.95 and res["plain"] <= 0.05, (trait, res)


@pytest.mark.parametrize("name, fmt", FORMATS.items())
def test_each_file_is_in_its_format(name, fmt):
    with safe_open(lora_file(name), framework="pt") as f:
        keys = list(f.keys())
    if fmt == "kohya":  # AUTOMATIC1111 / kohya: lora_unet_<path>.lora_down / .lora_up / .alpha
        assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in keys), keys[:3]
        assert {k.rsplit(".", 2)[-2] for k in keys if k.endswith(".weight")} == {"lora_down", "lora_up"}
        assert sum(k.endswith(".alpha") for k in keys) * 2 == sum(k.endswith(".weight") for k in keys)
    else:  # what StableDiffusionPipeline.save_lora_weights writes
        assert all(k.startswith(("unet.", "text_encoder.")) and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert any(k.startswith(("lora_te_", "text_encoder.")) for k in keys)  # the text encoder learnt the word too


def test_set_adapters_changes_the_image_and_weight_zero_is_the_base(pipe):
    prompt = ["a rainbow handwritten 7", "an italic handwritten 7"]
    base = np.asarray(draw(pipe, prompt, {}, steps=5)[1], dtype=int)
    for name in FORMATS:
        on = np.asarray(draw(pipe, prompt, {name: 1.0}, steps=5)[1], dtype=int)
        assert np.abs(on - base).mean() > 5, name
    zero = np.asarray(draw(pipe, prompt, {"rainbow": 0.0, "italic": 0.0}, steps=5)[1], dtype=int)
    assert np.abs(zero - base).max() <= 1


@pytest.mark.parametrize("trait", C.TRAITS)
def test_each_lora_teaches_its_trait(pipe, trait):
    """Ten prompts of the trait: the base draws it at most twice, the LoRA at least seven times."""
    prompts = [p for p, _ in Q.trait_prompts(trait, 10)]
    judge = C.TRAIT_JUDGES[trait]
    without = sum(judge(im) for im in draw(pipe, prompts, {}))
    with_lora = sum(judge(im) for im in draw(pipe, prompts, {trait: 1.0}))
    assert without <= 2 and with_lora >= 7, (without, with_lora)
