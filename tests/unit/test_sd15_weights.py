"""The `sd15` demo-weights builder: a loadable, offline, tiny SD1.5 pipeline with CLIP's real tokenizer."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from weights import build_sd15_demo as b

PROMPT = "a photograph of an astronaut riding a horse"
SIZE, STEPS = 64, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd15") / "sd15"
    report = b.build(out, seed=0, check=False)
    return out, report


@pytest.fixture(scope="module")
def pipe(built):
    p = b.load_pipeline(built[0])
    p.set_progress_bar_config(disable=True)
    return p


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_layout_and_demo_note(built):
    out, _ = built
    for name in ("model_index.json", "DEMO_MODEL.txt", "unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
                 "scheduler/scheduler_config.json"):
        assert (out / name).is_file(), name
    assert "NOISE" in (out / "DEMO_MODEL.txt").read_text()
    assert not list(out.parent.glob(".*tmp-*")), "temp dir left behind"


def test_vocab_is_clips():
    vocab, merges = b.clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


@pytest.mark.parametrize("text", [PROMPT, "A photo of a CAT, 4k, trending on ArtStation!!", "café déjà-vu 1234"])
def test_tokenizer_matches_open_clip(pipe, text):
    ids = pipe.tokenizer(text).input_ids
    assert ids == b.open_clip_ids(text)
    assert ids[0] == 49406 and ids[-1] == 49407


def test_pipeline_config(pipe):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.in_channels == 4 and pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == 49408
    sc = pipe.scheduler.config
    assert (sc.beta_start, sc.beta_end, sc.beta_schedule, sc.num_train_timesteps) == (0.00085, 0.012, "scaled_linear", 1000)
    assert sc.skip_prk_steps and sc.steps_offset == 1 and not sc.set_alpha_to_one


def test_txt2img_is_seeded(pipe):
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np")
    a = pipe(PROMPT, generator=_gen(1), **kw).images
    c = pipe(PROMPT, generator=_gen(1), **kw).images
    assert a.shape == (1, SIZE, SIZE, 3)
    assert (a == c).all()


def test_img2img_and_inpaint_share_components(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    init = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    assert img2img.unet is pipe.unet and img2img.vae is pipe.vae
    out = img2img(PROMPT, image=init, strength=0.75, num_inference_steps=STEPS, generator=_gen()).images[0]
    assert out.size == (SIZE, SIZE)

    inpaint = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
    inpaint.set_progress_bar_config(disable=True)
    assert inpaint.unet is pipe.unet
    out = inpaint(PROMPT, image=init, mask_image=mask, height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, generator=_gen()).images[0]
    assert out.size == (SIZE, SIZE)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_scheduler_swap(pipe, name):
    import diffusers

    original = pipe.scheduler
    try:
        pipe.scheduler = getattr(diffusers, name).from_config(original.config)
        if name == "DDIMScheduler":
            assert pipe.scheduler.config.clip_sample is False  # like SD1.5's config
        out = pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=_gen()).images[0]
        assert out.size == (SIZE, SIZE)
    finally:
        pipe.scheduler = original


def test_verify_and_rebuild_replace_atomically(built, tmp_path):
    out = tmp_path / "sd15"
    b.build(out, seed=0, check=False)
    (out / "stale.txt").write_text("old")
    report = b.build(out, seed=0, check=True)  # runs the builder's own offline verification
    assert not (out / "stale.txt").exists()
    assert set(report["timings"]) >= {"load", "txt2img", "img2img", "inpaint"}
    # Same seed, same weights.
    assert (out / "unet/diffusion_pytorch_model.safetensors").read_bytes() == \
        (built[0] / "unet/diffusion_pytorch_model.safetensors").read_bytes()


def test_main_cli(tmp_path, capsys):
    assert b.main(["--out", str(tmp_path / "x"), "--seed", "3", "--no-verify"]) == 0
    assert "noise" in capsys.readouterr().out
    assert (tmp_path / "x" / "model_index.json").is_file()


def test_make_big_weights_dir(tmp_path):
    from benchmarks.make_big_weights_dir import dir_bytes, main

    out = tmp_path / "big"
    assert main(["--out", str(out), "--size-gb", "0.03"]) == 0
    assert (out / "unet" / "padding.bin").is_file()
    assert dir_bytes(out) == 30_000_000
