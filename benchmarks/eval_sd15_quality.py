"""Measure what the trained `sd15` demo draws, through the real handler, judged by the `cam` classifier.

Every image is requested from handlers.sd15.Sd15Handler loaded in-process (harness.inprocess,
the model dir laid out like an unpacked archive with model_configs/sd15/cpu.yaml), at the
handler's defaults (pndm, 25 steps, guidance 7.5, 64x64 = the model's native size) except where a
check says otherwise. Digits are judged by the `cam` demo classifier on the ink picture
max(R, G, B) (weights/sd15_captions.py explains why), colours by the dominant foreground hue.

    .venv/bin/python -m benchmarks.eval_sd15_quality [--weights weights/demo/sd15] [--num 200]

Writes benchmarks/results/sd15-quality.md and one PNG grid per prompt family
(benchmarks/results/sd15-quality-<family>.png). Exits 1 when a goal is missed.

The check functions (`adherence`, `colour_adherence`, `negative_prompt`, `img2img`, `inpainting`,
`lora_traits`, `lora_batch`) are also what tests/unit/test_sd15_semantics.py runs, with fewer
samples. The LoRA checks send the request field `loras` with the files of the weights' `loras/`
(weights/train_sd15_lora.py).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from weights import digits
from weights import sd15_captions as C

DEFAULT_WEIGHTS = "weights/demo/sd15"
SIZE = C.IMAGE_SIZE
LATENT_CELL = 8  # pixels per latent cell (the VAE's downscale factor)
GOALS = {
    "adherence": 0.85, "adherence_per_digit": 0.70, "colour": 0.85, "guidance_gain": 0.20,
    "negative_factor": 5.0, "img2img_keep": 0.90, "img2img_change": 0.70, "inpaint_extra_mae": 2.0,
    "inpaint_digit": 0.70, "lora_without": 0.10, "lora_with": 0.85, "lora_digit": 0.85, "lora_batch": 0.85,
}
LORA_SCALES = (0.5, 1.0)


# serving --------------------------------------------------------------------------------------
def load(weights: str | Path = DEFAULT_WEIGHTS, tmp: Path | None = None):
    """(handler, ctx) of handlers.sd15 on `weights`, as TorchServe's worker would load the archive."""
    from handlers.sd15.handler import Sd15Handler
    from harness.inprocess import load_handler, unpack

    tmp = Path(tmp or tempfile.mkdtemp(prefix="sd15-eval-")) / "model"
    return load_handler(Sd15Handler, "sd15", unpack(tmp, "sd15", Path(weights)))


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def generate(handler, ctx, bodies: list[dict], chunk: int = 40) -> list[Image.Image]:
    """One image per body (each a full sd15 request), through handler.handle in batches."""
    from harness.context import run_batch

    out = []
    for start in range(0, len(bodies), chunk):
        rows = [{"body": b} for b in bodies[start:start + chunk]]
        answers = run_batch(handler, ctx, rows)
        for i, answer in enumerate(answers):
            if ctx.status(i) != 200:
                raise RuntimeError(f"sd15 answered {ctx.status(i)}: {answer}")
            (img,) = json.loads(answer)["images"]
            out.append(Image.open(io.BytesIO(base64.b64decode(img))).convert("RGB"))
    return out


# checks ---------------------------------------------------------------------------------------
def adherence(handler, ctx, judge, per_digit: int, seed: int = 0, template: str = "a handwritten {d}",
              **params) -> dict:
    """`template` for every digit, `per_digit` samples each: share classified as the digit asked for."""
    asked = [d for d in range(10) for _ in range(per_digit)]
    bodies = [{"prompt": template.format(d=d), "seed": seed + i, **params} for i, d in enumerate(asked)]
    images = generate(handler, ctx, bodies)
    probs = judge.probabilities(images)
    pred = probs.argmax(1).numpy()
    asked = np.array(asked)
    per = [float((pred[asked == d] == d).mean()) for d in range(10)]
    return {"share": float((pred == asked).mean()), "per_digit": per, "min_digit": min(per),
            "p_asked": float(probs[np.arange(len(asked)), asked].mean()), "n": len(asked),
            "images": images, "asked": asked.tolist(), "pred": pred.tolist()}


def colour_adherence(handler, ctx, judge, n: int, seed: int = 0, **params) -> dict:
    """"a <colour> handwritten <d>" over all colours and digits: share whose dominant hue is the colour."""
    k = len(C.COLOUR_NAMES)
    jobs = [(C.COLOUR_NAMES[i % k], (i // k) % 10) for i in range(n)]
    bodies = [{"prompt": f"a {c} handwritten {d}", "seed": seed + i, **params} for i, (c, d) in enumerate(jobs)]
    images = generate(handler, ctx, bodies)
    got = [C.dominant_colour(im) for im in images]
    pred = judge.predict(images)
    per = {c: float(np.mean([g == c for (cc, _), g in zip(jobs, got) if cc == c])) for c in C.COLOUR_NAMES}
    return {"share": float(np.mean([g == c for (c, _), g in zip(jobs, got)])), "per_colour": per,
            "digit_share": float(np.mean([p == d for (_, d), p in zip(jobs, pred)])), "n": n,
            "images": images, "jobs": jobs, "got": got}


def negative_prompt(handler, ctx, judge, n: int, seed: int = 0, digit: int = 3, **params) -> dict:
    """Empty prompt, without and with negative_prompt "a handwritten <digit>": share of <digit>s."""
    res = {}
    for name, neg in (("without", ""), ("with", f"a handwritten {digit}")):
        bodies = [{"prompt": "", "negative_prompt": neg, "seed": seed + i, **params} for i in range(n)]
        images = generate(handler, ctx, bodies)
        probs = judge.probabilities(images)
        pred = probs.argmax(1).numpy()
        res[name] = {"share": float((pred == digit).mean()), "p": float(probs[:, digit].mean()),
                     "images": images, "pred": pred.tolist(),
                     "shares": np.bincount(pred, minlength=10) / n}
    res["factor"] = res["without"]["share"] / max(res["with"]["share"], 1e-9)
    res["n"] = n
    return res


def img2img(handler, ctx, judge, n: int, source_digit: int, prompt: str, strength: float, target: int,
            seed: int = 0, **params) -> dict:
    """img2img from held-out <source_digit>s (cycling colours): share classified as `target`."""
    inputs = [C.heldout_digit(source_digit, C.COLOUR_NAMES[i % len(C.COLOUR_NAMES)], nth=i % 30) for i in range(n)]
    bodies = [{"prompt": prompt, "image": png_b64(im), "strength": strength, "seed": seed + i, **params}
              for i, im in enumerate(inputs)]
    images = generate(handler, ctx, bodies)
    pred = np.array(judge.predict(images))
    return {"share": float((pred == target).mean()), "source_share": float((pred == source_digit).mean()),
            "inputs": inputs, "images": images, "pred": pred.tolist(), "n": n}


def half_mask(size: int = SIZE) -> np.ndarray:
    """Repaint the right half (white), keep the left half."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255
    return mask


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """Binary dilation by a (2px+1)-square: the mask grown by `px` pixels in every direction."""
    grown = mask > 0
    padded = np.pad(grown, px)
    h, w = grown.shape
    out = np.zeros_like(grown)
    for dy in range(2 * px + 1):
        for dx in range(2 * px + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def vae_roundtrip(handler, image: Image.Image) -> np.ndarray:
    """What the served VAE alone does to `image`: encode (mean) -> decode, as uint8-valued ints."""
    vae = handler.model.pipes["txt2img"].vae
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.inference_mode():
        rt = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((rt[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().numpy().astype(int)


def inpainting(handler, ctx, judge, n: int, seed: int = 0, dilation: int = LATENT_CELL, **params) -> dict:
    """Two checks on held-out digits (cycling colours and classes):

    * keep: the right half is repainted with "a handwritten <d>" (d != the input's digit); outside
      the mask dilated by `dilation` px, the mean abs difference to the input (0..255) must stay
      within the VAE round trip's own difference there + 2;
    * digit: the whole digit is masked (an all-white mask) and "a handwritten <d>" must be drawn:
      share classified as d.
    """
    k = len(C.COLOUR_NAMES)
    srcs = [(i % 10, C.COLOUR_NAMES[i % k], (i % 10 + 1 + i % 9) % 10) for i in range(n)]  # (input digit, colour, asked)
    inputs = [C.heldout_digit(d, c, nth=i % 30) for i, (d, c, _) in enumerate(srcs)]
    half = half_mask()
    outside = ~dilate(half, dilation)
    keep_bodies = [{"prompt": f"a handwritten {a}", "image": png_b64(im), "mask": png_b64(Image.fromarray(half)),
                    "seed": seed + i, **params} for i, (im, (_, _, a)) in enumerate(zip(inputs, srcs))]
    keep_images = generate(handler, ctx, keep_bodies)
    errs, vae_errs, inside = [], [], []
    for src, out in zip(inputs, keep_images):
        a, b = np.asarray(src, dtype=int), np.asarray(out, dtype=int)
        errs.append(np.abs(b - a)[outside].mean())
        vae_errs.append(np.abs(vae_roundtrip(handler, src) - a)[outside].mean())
        inside.append(np.abs(b - a)[half > 0].mean())
    full = np.full((SIZE, SIZE), 255, np.uint8)
    digit_bodies = [{"prompt": f"a handwritten {a}", "image": png_b64(im), "mask": png_b64(Image.fromarray(full)),
                     "seed": seed + i, **params} for i, (im, (_, _, a)) in enumerate(zip(inputs, srcs))]
    digit_images = generate(handler, ctx, digit_bodies)
    pred = np.array(judge.predict(digit_images))
    asked = np.array([a for _, _, a in srcs])
    return {"outside_mae": float(np.mean(errs)), "vae_mae": float(np.mean(vae_errs)),
            "extra_mae": float(np.mean(errs) - np.mean(vae_errs)),
            "per_sample_ok": float(np.mean([e <= v + 2 for e, v in zip(errs, vae_errs)])),
            "inside_change": float(np.mean(inside)), "digit_share": float((pred == asked).mean()),
            "inputs": inputs, "keep_images": keep_images, "digit_images": digit_images, "asked": asked.tolist(),
            "pred": pred.tolist(), "n": n, "dilation": dilation, "outside_pixels": int(outside.sum())}


def trait_prompts(trait: str, n: int) -> list[tuple[str, int]]:
    """`n` (prompt, digit asked for) pairs in the trait's caption styles, cycling digits and colours."""
    caps, k = C.TRAIT_CAPTIONS[trait], len(C.COLOUR_NAMES)
    return [(caps[i % len(caps)].format(d=i % 10, w=C.NUMBER_WORDS[i % 10], c=C.COLOUR_NAMES[(i // 10) % k]), i % 10)
            for i in range(n)]


def judge_traits(judge, images: list, asked: list[int]) -> dict:
    """Share of `images` each trait judge accepts, and share showing the digit asked for."""
    pred = judge.predict(images)
    return {"traits": {t: float(np.mean([C.TRAIT_JUDGES[t](im) for im in images])) for t in C.TRAITS},
            "digit_share": float(np.mean([p == a for p, a in zip(pred, asked)])), "images": images}


def lora_traits(handler, ctx, judge, n: int, trait: str, seed: int = 0, scales=LORA_SCALES, **params) -> dict:
    """The trait's prompts ("a rainbow handwritten 7", ...), the same `n` seeds without the LoRA
    named `trait` (no `loras`) and with it at each scale: per arm the share of images each trait
    judge accepts and the share showing the digit asked for."""
    jobs = trait_prompts(trait, n)
    asked = [d for _, d in jobs]
    arms = {}
    for scale in (None, *scales):
        lora = {} if scale is None else {"loras": [{"name": trait, "scale": scale}]}
        bodies = [{"prompt": prompt, "seed": seed + i, **lora, **params} for i, (prompt, _) in enumerate(jobs)]
        arms["without" if scale is None else scale] = judge_traits(judge, generate(handler, ctx, bodies), asked)
    return {"trait": trait, "arms": arms, "n": n, "prompts": [p for p, _ in jobs]}


def lora_batch(handler, ctx, judge, n: int, seed: int = 0, **params) -> dict:
    """Requests for each trait in turn, each with its own LoRA, so every handler batch holds all of
    them: per trait, the share of its images showing its trait and none of the others'."""
    prompts = {t: trait_prompts(t, n) for t in C.TRAITS}
    jobs = [(t, *prompts[t][i]) for i in range(n // len(C.TRAITS)) for t in C.TRAITS]
    bodies = [{"prompt": prompt, "seed": seed + i, "loras": [{"name": t, "scale": 1.0}], **params}
              for i, (t, prompt, _) in enumerate(jobs)]
    images = generate(handler, ctx, bodies)
    shows = [{t: C.TRAIT_JUDGES[t](im) for t in C.TRAITS} for im in images]
    own = {t: float(np.mean([s[t] and not any(v for o, v in s.items() if o != t)
                             for (tt, _, _), s in zip(jobs, shows) if tt == t])) for t in C.TRAITS}
    pred = judge.predict(images)
    return {"own": own, "digit_share": float(np.mean([p == d for p, (_, _, d) in zip(pred, jobs)])), "n": len(jobs),
            "images": images, "jobs": jobs}


def trait_judges_on_ground_truth(per_colour: int = 40) -> dict:
    """Each trait judge on rendered held-out digits: the share it accepts among renders of its trait
    and among plain renders (every colour)."""
    images, _ = digits.load_arrays()
    _, test = digits.split_indices(seed=0)
    gray = images[test][:per_colour]
    plain = [C.to_pil(x) for c in C.COLOUR_NAMES for x in C.render(gray, c)]
    out = {}
    for t in C.TRAITS:
        shown = [C.to_pil(x) for c in C.COLOUR_NAMES for x in C.render_trait(t, gray, c)]
        out[t] = {"trait": float(np.mean([C.TRAIT_JUDGES[t](im) for im in shown])),
                  "plain": float(np.mean([C.TRAIT_JUDGES[t](im) for im in plain])), "n": len(shown)}
    return out


# grids ----------------------------------------------------------------------------------------
def save_grid(rows: list[list[Image.Image]], labels: list[str], path: Path, scale: int = 2) -> None:
    """Rows of equally sized images, each upscaled (nearest) by `scale`, a text label left of each row."""
    cell = SIZE * scale
    pad, label_w = 4, 150
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + cols * (cell + pad), len(rows) * (cell + pad)), (60, 60, 60))
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels)):
        y = r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), label, fill=(255, 255, 255))
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + c * (cell + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask).convert("RGB")


# report ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="trained sd15 demo directory")
    p.add_argument("--cam", default="weights/demo/cam", help="cam demo weights directory (the judge)")
    p.add_argument("--num", type=int, default=200, help="samples per check")
    p.add_argument("--scheduler-num", type=int, default=100, help="samples per scheduler x steps cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    p.add_argument("--out", default="benchmarks/results/sd15-quality", help="report path without extension")
    return p.parse_args(argv)


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    handler, ctx = load(args.weights)
    torch.set_num_threads(args.threads)  # the handler set the config's threads; this run's choice wins
    judge = C.DigitJudge(args.cam)
    n, per_digit = args.num, max(1, args.num // 10)
    timings = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        res = fn(*a, **kw)
        timings[name] = time.perf_counter() - t0
        print(f"{name}: {timings[name]:.0f} s", file=sys.stderr)
        return res

    seed = args.seed
    adh = timed("adherence g7.5", adherence, handler, ctx, judge, per_digit, seed)
    adh1 = timed("adherence g1.0", adherence, handler, ctx, judge, per_digit, seed, guidance_scale=1.0)
    col = timed("colour", colour_adherence, handler, ctx, judge, n, seed)
    neg = timed("negative", negative_prompt, handler, ctx, judge, n, seed)
    keep = timed("img2img 0.3", img2img, handler, ctx, judge, n // 2, 7, "a 7", 0.3, 7, seed)
    keep2 = timed("img2img 0.3 a 2", img2img, handler, ctx, judge, n // 2, 7, "a 2", 0.3, 2, seed)
    change = timed("img2img 0.9", img2img, handler, ctx, judge, n // 2, 7, "a 2", 0.9, 2, seed)
    inp = timed("inpainting", inpainting, handler, ctx, judge, n // 2, seed)
    loras = {t: timed(f"lora {t}", lora_traits, handler, ctx, judge, n, t, seed) for t in C.TRAITS}
    mixed = timed("loras in one batch", lora_batch, handler, ctx, judge, n // 2, seed)
    truth = trait_judges_on_ground_truth()
    sched = {}
    for s in ("pndm", "ddim", "euler", "dpm++"):
        for steps in (10, 25, 50):
            t0 = time.perf_counter()
            r = adherence(handler, ctx, judge, max(1, args.scheduler_num // 10), seed, scheduler=s, steps=steps)
            sched[(s, steps)] = (r, (time.perf_counter() - t0) / r["n"])
            print(f"{s} {steps}: {pct(r['share'])}", file=sys.stderr)

    gain = adh["share"] - adh1["share"]
    checks = [
        ("prompt adherence, \"a handwritten <d>\"", pct(adh["share"]), f">= {pct(GOALS['adherence'])}",
         adh["share"] >= GOALS["adherence"]),
        ("... worst digit", f"{pct(adh['min_digit'])} (digit {int(np.argmin(adh['per_digit']))})",
         f">= {pct(GOALS['adherence_per_digit'])}", adh["min_digit"] >= GOALS["adherence_per_digit"]),
        ("colour adherence, \"a <colour> handwritten <d>\"", pct(col["share"]), f">= {pct(GOALS['colour'])}",
         col["share"] >= GOALS["colour"]),
        ("guidance: adherence at 7.5 minus at 1.0", f"{100 * gain:+.1f} points ({pct(adh['share'])} vs "
         f"{pct(adh1['share'])})", f">= +{100 * GOALS['guidance_gain']:.0f} points", gain >= GOALS["guidance_gain"]),
        ("negative prompt: share of 3s without / with", f"{pct(neg['without']['share'])} / {pct(neg['with']['share'])}"
         f" ({neg['factor']:.1f}x fewer)" if neg["with"]["share"] > 0 else
         f"{pct(neg['without']['share'])} / 0 %", f">= {GOALS['negative_factor']:.0f}x fewer",
         neg["factor"] >= GOALS["negative_factor"]),
        ("img2img 0.3, held-out 7, \"a 7\": stays a 7", pct(keep["share"]), f">= {pct(GOALS['img2img_keep'])}",
         keep["share"] >= GOALS["img2img_keep"]),
        ("img2img 0.9, held-out 7, \"a 2\": becomes a 2", pct(change["share"]), f">= {pct(GOALS['img2img_change'])}",
         change["share"] >= GOALS["img2img_change"]),
        (f"inpainting, right half: mean abs diff outside the mask dilated by {inp['dilation']} px (0..255)",
         f"{inp['outside_mae']:.2f} (VAE round trip {inp['vae_mae']:.2f}, +{inp['extra_mae']:.2f})",
         f"<= round trip + {GOALS['inpaint_extra_mae']:.0f}", inp["extra_mae"] <= GOALS["inpaint_extra_mae"]),
        ("inpainting, whole digit masked, \"a handwritten <d>\": draws d", pct(inp["digit_share"]),
         f">= {pct(GOALS['inpaint_digit'])} (own goal)", inp["digit_share"] >= GOALS["inpaint_digit"]),
    ]
    for t, res in loras.items():
        share = {arm: r["traits"][t] for arm, r in res["arms"].items()}
        with_lora = res["arms"][1.0]
        checks += [
            (f"LoRA `{t}`, \"{C.TRAIT_CAPTIONS[t][0].format(d='<d>', c='<colour>')}\"-style prompts: show {t}, "
             "without / scale 0.5 / 1", " / ".join(pct(share[arm]) for arm in ("without", 0.5, 1.0)),
             f"< {pct(GOALS['lora_without'])} / in between / >= {pct(GOALS['lora_with'])}",
             share["without"] < GOALS["lora_without"] and share["without"] < share[0.5] < share[1.0]
             and share[1.0] >= GOALS["lora_with"]),
            (f"... digit asked for, with `{t}` at scale 1", pct(with_lora["digit_share"]),
             f">= {pct(GOALS['lora_digit'])}", with_lora["digit_share"] >= GOALS["lora_digit"]),
        ]
    checks.append(("two requests with different LoRAs in one batch each get theirs: own trait and not the other's",
                   " / ".join(f"{t} {pct(v)}" for t, v in mixed["own"].items()), f">= {pct(GOALS['lora_batch'])} each",
                   min(mixed["own"].values()) >= GOALS["lora_batch"]))
    ok = all(c[3] for c in checks)
    training = {}
    tj = Path(args.weights) / "training.json"
    if tj.is_file():
        training = json.loads(tj.read_text())
    name = out.name
    lines = [
        "# sd15 demo: what the trained model draws, judged by the cam classifier",
        "",
        f"**Overall: {'PASS' if ok else 'FAIL'}.** Weights `{args.weights}`, served by `handlers/sd15.py` "
        "in-process (harness.inprocess, model_configs/sd15/cpu.yaml) at its defaults (pndm, 25 steps, "
        f"guidance 7.5, {SIZE}x{SIZE}) except where stated; seeds {seed}.. per check. Digits judged by the "
        "`cam` demo classifier on max(R, G, B) (a coloured digit on black becomes exactly the white-on-black "
        "ink it was trained on; luminance would make a blue digit nearly black), colours by the palette "
        "colour most foreground pixels (max(R, G, B) > 0.35) are nearest to in chromaticity. "
        "Generated by `python -m benchmarks.eval_sd15_quality`.",
        "",
        "| check | measured | goal | result |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {'PASS' if d else 'FAIL'} |" for a, b, c, d in checks),
        "",
        f"Samples: {adh['n']} per adherence run ({per_digit} per digit), {col['n']} for colour, "
        f"{neg['n']} per negative-prompt arm, {keep['n']} per img2img run, {inp['n']} per inpainting check, "
        f"{n} per LoRA arm, {mixed['n']} in the mixed LoRA batches.",
        "",
        "## Details",
        "",
        "Prompt adherence per digit (share classified as the digit asked for):",
        "",
        "| guidance | " + " | ".join(str(d) for d in range(10)) + " | all | mean p(asked) |",
        "|---" * 13 + "|",
        *(f"| {g} | " + " | ".join(f"{100 * s:.0f}" for s in r["per_digit"]) + f" | {pct(r['share'])} | "
          f"{r['p_asked']:.3f} |" for g, r in (("7.5", adh), ("1.0", adh1))),
        "",
        "Colour adherence per colour: " + ", ".join(f"{c} {pct(s)}" for c, s in col["per_colour"].items())
        + f"; the digit of those prompts is drawn in {pct(col['digit_share'])}.",
        "",
        "Negative prompt, empty prompt: predicted digit shares without / with `negative_prompt: \"a handwritten 3\"`:",
        "",
        "| | " + " | ".join(str(d) for d in range(10)) + " |",
        "|---" * 11 + "|",
        *(f"| {k} | " + " | ".join(f"{100 * s:.0f}" for s in neg[k]["shares"]) + " |" for k in ("without", "with")),
        "",
        f"Mean classifier probability of a 3: {neg['without']['p']:.3f} without, {neg['with']['p']:.3f} with the "
        "negative prompt.",
        "",
        f"img2img from held-out 7s: strength 0.3 \"a 7\" -> 7 in {pct(keep['share'])}; strength 0.3 \"a 2\" -> "
        f"still a 7 in {pct(keep2['source_share'])}, a 2 in {pct(keep2['share'])} (low strength keeps the input); "
        f"strength 0.9 \"a 2\" -> 2 in {pct(change['share'])} (still a 7 in {pct(change['source_share'])}).",
        "",
        f"Inpainting: the mask is the right half (x >= {SIZE // 2}); dilated by {inp['dilation']} px it leaves the "
        f"left {SIZE // 2 - inp['dilation']} columns ({inp['outside_pixels']} pixels) as 'outside'. At 512 px, "
        "8 px is one latent cell of SD1.5's VAE (downscale 8); this model has the same downscale, so 8 px is "
        "again one latent cell -- the unit in which diffusers blends the kept latents -- rather than 8/512 "
        f"of the width (1 px). Per sample, {pct(inp['per_sample_ok'])} are within their own round trip + 2. "
        "handlers/sd15.py pastes the input's own pixels back outside the (undilated) mask after decoding "
        "(diffusers' apply_overlay), so outside the mask the result is the input itself; what the model "
        "contributes is visible at the seam in the grid. "
        f"Inside the mask the picture changed by {inp['inside_change']:.1f} on average (0..255).",
        "",
        "## LoRAs",
        "",
        "Two LoRAs of `weights/demo/sd15/loras/`, trained by `weights/train_sd15_lora.py`, each teaching a trait "
        f"the base model cannot draw: `rainbow` (the digit in bands of {', '.join(C.RAINBOW)}, top to bottom) and "
        f"`italic` (leaning right by {C.ITALIC_SLANT} px per px). Judged by weights/sd15_captions.py: rainbow = at "
        f"least {C.RAINBOW_MIN_COLOURS} palette colours each on {pct(C.RAINBOW_MIN_SHARE)} of the foreground or "
        f"more; italic = the ink's slant (second moments) at least {C.ITALIC_JUDGE}. The judges on rendered "
        "held-out digits, every colour: " + "; ".join(
            f"{t} accepts {pct(r['trait'])} of {t} renders and {pct(r['plain'])} of plain ones" for t, r in truth.items())
        + ". Purple or outlined digits are out of reach: a LoRA adapts the UNet and text encoder, and the frozen "
        "VAE draws neither (the training script's docstring).",
        "",
        "| LoRA | arm | " + " | ".join(f"shows {t}" for t in C.TRAITS) + " | digit asked for |",
        "|---" * (3 + len(C.TRAITS)) + "|",
        *(f"| {t} | {'without' if arm == 'without' else f'scale {arm}'} | "
          + " | ".join(pct(r["traits"][o]) for o in C.TRAITS) + f" | {pct(r['digit_share'])} |"
          for t, res in loras.items() for arm, r in res["arms"].items()),
        "",
        f"Mixed batches ({mixed['n']} requests alternating " + " / ".join(f"`{t}`" for t in C.TRAITS)
        + ", 40 per handler batch): " + ", ".join(f"{t} requests show {t} and no other trait in {pct(v)}"
                                                 for t, v in mixed["own"].items())
        + f"; the digit asked for in {pct(mixed['digit_share'])}.",
        "",
        "## Schedulers",
        "",
        f"Prompt adherence for \"a handwritten <d>\", {max(1, args.scheduler_num // 10) * 10} samples per cell, "
        "guidance 7.5; time per image in seconds (this run, in-process, batches of 40, "
        f"{args.threads} threads, shared machine).",
        "",
        "| scheduler | 10 steps | 25 steps | 50 steps | s/image at 10 / 25 / 50 |",
        "|---|---|---|---|---|",
        *(f"| {s} | " + " | ".join(pct(sched[(s, k)][0]["share"]) for k in (10, 25, 50)) + " | "
          + " / ".join(f"{sched[(s, k)][1]:.3f}" for k in (10, 25, 50)) + " |"
          for s in ("pndm", "ddim", "euler", "dpm++")),
        "",
        "## Grids",
        "",
    ]
    grids = {}
    grids["prompts"] = ([[im for im, a in zip(adh["images"], adh["asked"]) if a == d][:10] for d in range(10)],
                        [f"a handwritten {d}" for d in range(10)], "rows: \"a handwritten <d>\" at guidance 7.5")
    grids["guidance"] = ([[im for im, a in zip(adh1["images"], adh1["asked"]) if a == d][:10] for d in range(10)],
                         [f"a handwritten {d}, g=1" for d in range(10)], "the same prompts and seeds at guidance 1.0")
    grids["colours"] = ([[im for im, (c, _) in zip(col["images"], col["jobs"]) if c == cn][:10]
                         for cn in C.COLOUR_NAMES],
                        [f"a {c} handwritten <d>" for c in C.COLOUR_NAMES],
                        "rows: colours; columns: digits 0..9 (\"a <colour> handwritten <d>\")")
    grids["negative"] = ([neg["without"]["images"][i:i + 10] for i in (0, 10)] +
                         [neg["with"]["images"][i:i + 10] for i in (0, 10)],
                         ["prompt \"\"", "prompt \"\"", "neg \"a handwritten 3\"", "neg \"a handwritten 3\""],
                         "empty prompt, same seeds: two rows without, two rows with the negative prompt")
    grids["img2img"] = ([keep["inputs"][:10], keep["images"][:10], keep2["images"][:10], change["images"][:10]],
                        ["input (held-out 7)", "0.3 \"a 7\"", "0.3 \"a 2\"", "0.9 \"a 2\""],
                        "row 1 the inputs; below, img2img of each at strength 0.3 / 0.3 / 0.9")
    half = mask_image(half_mask())
    grids["inpainting"] = ([inp["inputs"][:10], [half] * 10, inp["keep_images"][:10], inp["digit_images"][:10]],
                           ["input", "mask (white=repaint)", "right half repainted", "all repainted"],
                           "prompt \"a handwritten <d>\", d = " + " ".join(str(a) for a in inp["asked"][:10]))
    grids["schedulers"] = ([[[im for im, a in zip(sched[(s, k)][0]["images"], sched[(s, k)][0]["asked"]) if a == d][0]
                             for d in range(10)] for s in ("pndm", "ddim", "euler", "dpm++") for k in (10, 25, 50)],
                           [f"{s} {k} steps" for s in ("pndm", "ddim", "euler", "dpm++") for k in (10, 25, 50)],
                           "columns: \"a handwritten 0\" .. \"9\", first seed of each")
    arm_name = {"without": "without", 0.5: "scale 0.5", 1.0: "scale 1"}
    grids["loras"] = ([r["images"][:10] for res in loras.values() for r in res["arms"].values()]
                      + [mixed["images"][:10]],
                      [f"{t}: {arm_name[arm]}" for t, res in loras.items() for arm in res["arms"]] + ["one batch, both"],
                      "columns: digits 0..9 in the trait's prompts; the same seeds without the LoRA and at scales "
                      "0.5 and 1; last row requests alternating " + " / ".join(C.TRAITS) + " in one batch")
    for fam, (rows, labels, caption) in grids.items():
        path = out.parent / f"{name}-{fam}.png"
        save_grid(rows, labels, path)
        lines.append(f"- `{path.name}`: {caption}")
    lines += ["", "## Model", ""]
    if training:
        p = training.get("params", {})
        lines += [
            f"- reproduce: `{training.get('command')}`; {training.get('train_images')} training digits x "
            f"{len(training.get('colours', []))} colours, {training.get('distinct_captions')} distinct captions, "
            f"caption mix {training.get('caption_mix')}",
            "- params: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in p.items()),
            f"- VAE: reconstruction loss {training.get('vae_final_reconstruction_loss')}, round trip "
            f"{training.get('vae_roundtrip_mae_255')}/255 mean abs after phase 1 (the decoder fine-tuning of phase 4 "
            f"ends at loss {training.get('decoder_final_loss')}), scaling factor {training.get('vae_scaling_factor')}",
            f"- denoiser: final loss {training.get('final_loss')} ({training.get('final_loss_note')})",
            f"- training: {training.get('settings', {}).get('steps')} UNet + text encoder steps, wall time "
            f"{training.get('wall_time_s')} s ({training.get('times_s')}; phase 4 in a second process alongside "
            f"phase 3), CPU time {training.get('cpu_time_s')} s for phases 1-3, load average at start/end "
            f"{training.get('machine', {}).get('load_avg_1min_start_end')}",
        ]
    for path in sorted((Path(args.weights) / "loras").glob("*.json")):
        lj = json.loads(path.read_text())
        lines.append(f"- LoRA `{lj['lora']}`: `{lj['command']}`; {lj['format']} format, {lj['file_bytes'] / 1e3:.0f} KB, "
                     f"{lj['lora_params']} parameters (rank {lj['settings']['rank']}, UNet and text encoder attention), "
                     f"{lj['settings']['steps']} steps of {lj['settings']['batch_size']}, wall time {lj['wall_time_s']} s "
                     f"({lj['settings']['threads']} thread, load average at start/end "
                     f"{lj['machine']['load_avg_1min_start_end']}), final loss {lj['final_loss']}")
    lines += ["", "Evaluation time per check (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines[:20]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
