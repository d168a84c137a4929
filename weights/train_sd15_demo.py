"""Train the `sd15` demo: a small Stable Diffusion 1.5 pipeline on captioned, coloured digits.

Same component classes and directory layout as SD1.5 (StableDiffusionPipeline.save_pretrained):
CLIPTokenizer with the real CLIP BPE vocabulary (weights/build_sd15_demo.py), a small CLIPTextModel,
UNet2DConditionModel with cross-attention, AutoencoderKL with 4 latent channels and downscale 8,
and SD1.5's PNDMScheduler configuration (scaled_linear betas 0.00085..0.012, 1000 steps), which
the handler's DDIM / Euler / DPM++ schedulers are built from. Images are 64x64 RGB (8x8x4
latents, so the UNet's sample_size is 8 and the handler's default size is 64).

Four phases, each with a progress bar, all seeded (phase 4 needs only phase 1's VAE, so it runs
in a second process while phase 3 trains: two single-threaded processes use both cores, where
one process with two OpenMP threads would not):
  1. the VAE alone (L1 + MSE reconstruction, a tiny KL weight), then frozen;
  2. the latents of every training image in every colour, and SD's latent scaling factor
     (1 / std of the latents, as SD1.5's 0.18215 was chosen);
  3. the UNet and the text encoder jointly from scratch (epsilon prediction, DDPM noise), with
     15 % empty captions for classifier-free guidance, EMA weights saved;
  4. the VAE decoder alone (the encoder and so the latents stay as they were) on latents spliced
     from two images along latent-cell boundaries: a more local decoder, so inpainting keeps
     the pixels away from the mask.

    .venv/bin/python -m weights.train_sd15_demo [--out weights/demo/sd15] [--seed 0]

Data: weights/sd15_captions.py on the train part of weights.digits.split_indices(seed=0); the
held-out digits are never seen.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from weights import digits, sd15_captions  # noqa: E402
from weights.atomic import atomic_dir  # noqa: E402
from weights.build_sd15_demo import CLIP_VOCAB_SIZE, MODEL_MAX_LENGTH, write_tokenizer_files  # noqa: E402

DEFAULT_OUT = Path("weights/demo/sd15")
TRAINED_NOTE = "training.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="1 is fastest for this tiny model on a shared 2-core box (2 OpenMP threads wait on each other)")
    # VAE
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch-size", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-channels", type=lambda s: tuple(int(v) for v in s.split(",")), default=(8, 16, 32, 32))
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--decoder-steps", type=int, default=6000, help="phase 4: decoder locality fine-tuning")
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--decoder-splice-share", type=float, default=0.9, help="share of spliced latents per batch")
    # text encoder + UNet
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--unet-channels", type=lambda s: tuple(int(v) for v in s.split(",")), default=(32, 64, 64))
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--text-hidden", type=int, default=32)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# components ------------------------------------------------------------------------------------
def build_components(args, tok_dir: Path) -> dict:
    """Untrained tokenizer, text encoder, UNet, VAE and SD1.5's scheduler (PNDM) for 64x64 images."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MODEL_MAX_LENGTH)
    torch.manual_seed(args.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=args.text_hidden, intermediate_size=4 * args.text_hidden,
        num_hidden_layers=args.text_layers, num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=args.text_hidden, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(args.seed + 1)
    levels = len(args.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=sd15_captions.IMAGE_SIZE // 8,  # latent size: the handler's default is 8 x 8 = 64 px
        in_channels=4, out_channels=4,
        layers_per_block=args.layers_per_block,
        block_out_channels=args.unet_channels,
        # as SD1.5: cross-attention in every level but the lowest
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=args.text_hidden,
        attention_head_dim=8,  # SD1.5's value (diffusers reads it as the number of heads)
        norm_num_groups=16,
    )
    torch.manual_seed(args.seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=args.vae_channels,  # 4 blocks -> downscale 8 like SD1.5's VAE
        down_block_types=("DownEncoderBlock2D",) * len(args.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(args.vae_channels),
        layers_per_block=1, norm_num_groups=8, sample_size=sd15_captions.IMAGE_SIZE,
        # no global attention in the VAE's middle block: each latent cell decodes from its
        # neighbourhood only, so inpainting leaves pixels away from the mask as they were
        mid_block_add_attention=False,
    )
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    scheduler.register_to_config(clip_sample=False)  # as SD1.5's scheduler_config.json
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler)


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def training_images(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    images, labels = digits.load_arrays()
    train, test = digits.split_indices(seed=0)
    idx = train if split == "train" else test
    return images[idx], labels[idx]


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# phase 1: VAE ---------------------------------------------------------------------------------
def train_vae(vae, gray: np.ndarray, args, gen: torch.Generator) -> dict:
    """Reconstruction of random (digit, colour) renders; returns the final losses."""
    n, k = len(gray), len(sd15_captions.COLOUR_NAMES)
    colours = torch.tensor([sd15_captions.COLOURS[c] for c in sd15_captions.COLOUR_NAMES])  # (K, 3)
    ink = digits.upscale(gray, sd15_captions.IMAGE_SIZE)  # (N, 1, 64, 64)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(100, args.vae_steps), args.vae_steps))
    vae.train()
    recent_rec, recent_kl = [], []
    bar = tqdm(range(args.vae_steps), desc="1/4 vae", unit="step", disable=args.no_progress,
               dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        idx = torch.randint(0, n, (args.vae_batch_size,), generator=gen)
        col = torch.randint(0, k, (args.vae_batch_size,), generator=gen)
        x = (ink[idx] * colours[col].view(-1, 3, 1, 1)) * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec_loss + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        recent_rec.append(rec_loss.item())
        recent_kl.append(kl.item())
        del recent_rec[:-100], recent_kl[:-100]
        if step % 20 == 0 or step == args.vae_steps - 1:
            bar.set_postfix(rec=f"{np.mean(recent_rec):.4f}", kl=f"{np.mean(recent_kl):.1f}")
    bar.close()
    vae.eval().requires_grad_(False)
    return {"vae_final_reconstruction_loss": round(float(np.mean(recent_rec)), 5),
            "vae_final_kl_per_dim": round(float(np.mean(recent_kl)), 3)}


def splice_masks(n: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, cells, cells) masks in latent cells (1 = take image B): a vertical or horizontal
    split at a random cell boundary, or a random rectangle, like inpainting masks."""
    masks = torch.zeros(n, 1, cells, cells)
    kind = torch.randint(0, 3, (n,), generator=gen)
    a = torch.randint(1, cells, (n,), generator=gen)
    b = torch.randint(1, cells, (n,), generator=gen)
    for i in range(n):
        k, lo, hi = int(kind[i]), int(min(a[i], b[i])), int(max(a[i], b[i]))
        if k == 0:
            masks[i, :, :, lo:] = 1
        elif k == 1:
            masks[i, :, lo:, :] = 1
        else:
            masks[i, :, lo - 1:hi, lo - 1:hi] = 1
    return masks


def finetune_decoder(vae, gray: np.ndarray, args, gen: torch.Generator) -> dict:
    """Phase 4: the decoder alone (the encoder, hence every latent the UNet learned, is unchanged)
    learns locality. Half of each batch is plain reconstruction; the other half decodes latents
    spliced from two images along latent-cell boundaries and must give the same splice of the two
    pictures. Inpainting keeps the input's latents outside the mask, so with a local decoder the
    pixels away from the mask stay as the VAE round trip leaves them."""
    n, k = len(gray), len(sd15_captions.COLOUR_NAMES)
    colours = torch.tensor([sd15_captions.COLOURS[c] for c in sd15_captions.COLOUR_NAMES])
    ink = digits.upscale(gray, sd15_captions.IMAGE_SIZE)
    cells = sd15_captions.IMAGE_SIZE // 8
    decoder = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in decoder:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(decoder, lr=args.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(50, args.decoder_steps), args.decoder_steps))
    vae.decoder.train()
    recent = []
    bs = args.vae_batch_size
    bar = tqdm(range(args.decoder_steps), desc="4/4 vae decoder locality", unit="step", disable=args.no_progress,
               dynamic_ncols=True, file=sys.stderr, position=1)
    for step in bar:
        idx = torch.randint(0, n, (2, bs), generator=gen)
        col = torch.randint(0, k, (2, bs), generator=gen)
        xa = (ink[idx[0]] * colours[col[0]].view(-1, 3, 1, 1)) * 2 - 1
        xb = (ink[idx[1]] * colours[col[1]].view(-1, 3, 1, 1)) * 2 - 1
        with torch.no_grad():
            za, zb = vae.encode(xa).latent_dist.mean, vae.encode(xb).latent_dist.mean
        m = splice_masks(bs, cells, gen)
        m[: int(round(bs * (1 - args.decoder_splice_share)))] = 0  # the rest: plain reconstruction
        z = za * (1 - m) + zb * m
        mp = F.interpolate(m, scale_factor=8, mode="nearest")
        target = xa * (1 - mp) + xb * mp
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, target) + F.mse_loss(rec, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        opt.step()
        sched.step()
        recent.append(loss.item())
        del recent[:-100]
        if step % 20 == 0 or step == args.decoder_steps - 1:
            bar.set_postfix(loss=f"{np.mean(recent):.4f}")
    bar.close()
    vae.eval().requires_grad_(False)
    return {"decoder_final_loss": round(float(np.mean(recent)), 5)}


def finetune_decoder_process(vae, gray: np.ndarray, args, seed: int) -> tuple:
    """Phase 4 in a worker process: (the VAE with its fine-tuned decoder, info, seconds)."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    info = finetune_decoder(vae, gray, args, torch.Generator().manual_seed(seed))
    return vae, info, time.perf_counter() - t0



# phase 2: latents -----------------------------------------------------------------------------
def encode_dataset(vae, gray: np.ndarray, labels: np.ndarray, args, render=sd15_captions.render,
                   desc: str = "2/4 latents") -> dict:
    """Latent mean/std of every training digit in every colour (drawn by `render(gray, colour)`),
    SD's scaling factor, and the VAE's round-trip error on them (mean abs, in 0..255)."""
    means, stds, digit_of, colour_of, errs = [], [], [], [], []
    total = len(sd15_captions.COLOUR_NAMES)
    with torch.inference_mode():
        for ci, colour in enumerate(tqdm(sd15_captions.COLOUR_NAMES, desc=desc, unit="colour",
                                         disable=args.no_progress, dynamic_ncols=True, file=sys.stderr,
                                         total=total)):
            x = render(gray, colour) * 2 - 1
            for start in range(0, len(x), 256):
                post = vae.encode(x[start:start + 256]).latent_dist
                means.append(post.mean)
                stds.append(post.std)
            # the round trip (decode is the costly half) on the first 64 images of each colour
            rec = vae.decode(vae.encode(x[:64]).latent_dist.mean).sample.clamp(-1, 1)
            errs.append(((rec - x[:64]).abs() * 127.5).mean(dim=(1, 2, 3)))
            digit_of.append(torch.as_tensor(labels))
            colour_of.append(torch.full((len(labels),), ci))
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = 1.0 / mean.std().item()
    return {"mean": mean, "std": std, "digit": torch.cat(digit_of), "colour": torch.cat(colour_of),
            "scaling_factor": scaling, "roundtrip_mae_255": torch.cat(errs).mean().item()}


# phase 3: text encoder + UNet -----------------------------------------------------------------
def start_training(trainable: list, unet, text_encoder, args) -> tuple:
    """(optimizer, learning-rate schedule, EMA) for `trainable`, from the args' lr, warmup_steps,
    steps and ema_decay (AdamW without weight decay, linear warm-up then cosine, EMA with warm-up);
    both models in train mode."""
    from diffusers.training_utils import EMAModel

    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(args.warmup_steps, args.steps), args.steps))
    ema = EMAModel(trainable, decay=args.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    unet.train()
    text_encoder.train()
    return opt, sched, ema


def epsilon_step(unet, text_encoder, noise_sched, z0, ids, noise, t, trainable, opt, sched, ema) -> float:
    """One training step of the UNet (and text encoder) on epsilon MSE, as SD is trained: the noisy
    latents at timesteps `t`, conditioned on the captions `ids`; gradients clipped to norm 1, then
    the optimizer, the learning-rate schedule and the EMA step. Returns the loss."""
    cond = text_encoder(ids)[0]
    loss = F.mse_loss(unet(noise_sched.add_noise(z0, noise, t), t, encoder_hidden_states=cond).sample, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    sched.step()
    ema.step(trainable)
    return loss.item()


def show_loss(bar, recent: list[float], loss: float, keep: int, step: int, steps: int, sched) -> None:
    """Keeps the last `keep` losses in `recent`; their mean and the learning rate on the bar every 20 steps."""
    recent.append(loss)
    del recent[:-keep]
    if step % 20 == 0 or step == steps - 1:
        bar.set_postfix(loss=f"{np.mean(recent):.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")


def end_training(ema, trainable, unet, text_encoder) -> None:
    """The EMA weights into the trained parameters, both models back in eval mode."""
    ema.copy_to(trainable)
    unet.eval()
    text_encoder.eval()


def caption_sampler(tokenizer, gen: torch.Generator):
    """(digit, colour) tensors -> (B, 77) token ids of one random caption each, per CAPTION_MIX."""
    texts, table = sd15_captions.caption_table()
    ids = torch.tensor(tokenizer(texts, padding="max_length", max_length=MODEL_MAX_LENGTH,
                                 truncation=True).input_ids)
    kinds = list(sd15_captions.CAPTION_MIX)
    probs = torch.tensor([sd15_captions.CAPTION_MIX[k] for k in kinds])

    def sample(digit: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        kind = torch.multinomial(probs, len(digit), replacement=True, generator=gen)
        pick = torch.rand(len(digit), generator=gen)
        rows = []
        for d, c, k, r in zip(digit.tolist(), colour.tolist(), kind.tolist(), pick.tolist()):
            options = table[(d, c)][kinds[k]]
            rows.append(options[int(r * len(options))])
        return ids[rows]

    return sample, len(texts)


def train_denoiser(text_encoder, unet, latents: dict, tokenizer, args, gen: torch.Generator) -> dict:
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", clip_sample=False)
    sample_captions, num_captions = caption_sampler(tokenizer, gen)
    scale = latents["scaling_factor"]
    n = len(latents["mean"])
    trainable = list(unet.parameters()) + list(text_encoder.parameters())
    opt, sched, ema = start_training(trainable, unet, text_encoder, args)
    recent = []
    bar = tqdm(range(args.steps), desc="3/4 unet+text", unit="step", disable=args.no_progress,
               dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        z0 = (latents["mean"][idx] + latents["std"][idx] * torch.randn(latents["mean"][idx].shape, generator=gen)) * scale
        ids = sample_captions(latents["digit"][idx], latents["colour"][idx])
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(z0),), generator=gen)
        loss = epsilon_step(unet, text_encoder, noise_sched, z0, ids, noise, t, trainable, opt, sched, ema)
        show_loss(bar, recent, loss, 200, step, args.steps, sched)
    bar.close()
    end_training(ema, trainable, unet, text_encoder)
    return {"final_loss": round(float(np.mean(recent)), 5),
            "final_loss_note": "mean epsilon-MSE over the last 200 steps (raw weights; EMA weights are saved)",
            "distinct_captions": num_captions}


# main -----------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    gray, labels = training_images("train")
    load_before = os.getloadavg()[0]
    t_start, cpu_start = time.perf_counter(), time.process_time()
    times = {}
    with tempfile.TemporaryDirectory() as tok_tmp:
        write_tokenizer_files(Path(tok_tmp))
        comps = build_components(args, Path(tok_tmp))
    counts = {name: params(comps[name]) for name in ("text_encoder", "unet", "vae")}
    print("params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()), file=sys.stderr)

    t0 = time.perf_counter()
    info = train_vae(comps["vae"], gray, args, gen)
    times["vae_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    latents = encode_dataset(comps["vae"], gray, labels, args)
    comps["vae"].register_to_config(scaling_factor=round(latents["scaling_factor"], 5))
    times["latents_s"] = round(time.perf_counter() - t0, 1)

    # phase 4 (its own generator, so it does not change what phases 1-3 draw) in a spawned
    # process, started before phase 3 and joined after it
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        decoder_job = pool.submit(finetune_decoder_process, comps["vae"], gray, args, args.seed + 3)
        t0 = time.perf_counter()
        info.update(train_denoiser(comps["text_encoder"], comps["unet"], latents, comps["tokenizer"], args, gen))
        times["unet_text_s"] = round(time.perf_counter() - t0, 1)
        # the encoder comes back as it went (phase 4 trains only the decoder)
        comps["vae"], decoder_info, decoder_s = decoder_job.result()
    info.update(decoder_info)
    times["decoder_s_in_parallel"] = round(decoder_s, 1)
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start

    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = Path(args.out)
    with atomic_dir(out) as stage:
        pipe.save_pretrained(str(stage), safe_serialization=True)
        write_tokenizer_files(stage / "tokenizer")  # the CLIP files too, as SD1.5's tokenizer/ has them
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                    if k not in ("out", "no_progress")}
        report = {
            "model": "sd15 demo: a small Stable Diffusion 1.5 pipeline trained on captioned coloured digits",
            "command": "python -m weights.train_sd15_demo",
            "settings": settings,
            "image_size": sd15_captions.IMAGE_SIZE,
            "latent_shape": [4, sd15_captions.IMAGE_SIZE // 8, sd15_captions.IMAGE_SIZE // 8],
            "colours": sd15_captions.COLOUR_NAMES,
            "caption_mix": sd15_captions.CAPTION_MIX,
            "train_images": int(len(gray)),
            "split": "train part of weights.digits.split_indices(seed=0), every digit in every colour",
            "params": counts,
            "vae_scaling_factor": round(latents["scaling_factor"], 5),
            "vae_roundtrip_mae_255": round(latents["roundtrip_mae_255"], 3),
            **info,
            "weights": "EMA (text encoder + UNet), VAE as trained",
            "times_s": times,
            "wall_time_s": round(wall, 1),
            "cpu_time_s": round(cpu, 1),  # this process: phases 1-3 (phase 4 ran in its own)
            "machine": {"cpu_count": os.cpu_count(), "threads": args.threads,
                        "load_avg_1min_start_end": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                        "platform": platform.platform()},
            "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                         "transformers": __import__("transformers").__version__},
        }
        (stage / TRAINED_NOTE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved {out} ({size / 1e6:.1f} MB) in {wall:.0f} s: vae rec {info['vae_final_reconstruction_loss']}, "
          f"round trip {latents['roundtrip_mae_255']:.2f}/255, scaling {latents['scaling_factor']:.4f}, "
          f"denoiser loss {info['final_loss']}")
    return report


if __name__ == "__main__":
    main()
