"""Captioned, coloured digits for the trained `sd15` demo, and the judges that read them back.

The images are the scikit-learn digits of weights/digits.py, upscaled bilinearly and drawn in one
of a few colours on a black background (64x64 RGB). Captions name the digit, the colour, both or
neither, in varied wordings ("a red handwritten 7", "the number seven in red ink", "7", "").

The judges are shared by benchmarks/eval_sd15_quality.py and tests/unit/test_sd15_semantics.py:

* `ink(image)`: what the `cam` demo classifier (white ink on black, grayscale) should see. The
  value channel max(R, G, B) maps every palette colour back to the original ink intensity (a blue
  digit would be almost black in luminance: 0.114 x 255), so a coloured digit on the dark
  background becomes exactly the white-on-black digit cam was trained on.
* `dominant_colour(image)`: the palette colour nearest, in chromaticity (RGB divided by its
  maximum), to the majority of foreground (bright) pixels.
* `TRAIT_JUDGES`: whether an image shows a trait the base model cannot draw and a LoRA of
  weights/train_sd15_lora.py teaches it (`render_trait` draws the ground truth): `rainbow` (three
  or more palette colours, each on at least a tenth of the foreground) and `italic` (the ink's
  slant, from its second moments, at least ITALIC_JUDGE).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from weights import digits

IMAGE_SIZE = 64
# name -> RGB in [0, 1]; saturated, each with max channel ~1 so max(R, G, B) is the ink intensity
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.10, 0.10),
    "green": (0.15, 0.90, 0.15),
    "blue": (0.20, 0.40, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "white": (0.95, 0.95, 0.95),
}
COLOUR_NAMES = list(COLOURS)
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# {d} digit character, {w} number word, {c} colour name
DIGIT_AND_COLOUR = [
    "a {c} handwritten {d}",
    "the number {w} in {c} ink",
    "a {c} {d}",
    "a handwritten {d} in {c}",
    "{c} digit {d}",
    "the digit {w}, written in {c}",
    "a {c} number {w}",
    "{d}, {c}",
]
DIGIT_ONLY = [
    "a handwritten {d}",
    "{d}",
    "a {d}",
    "the number {w}",
    "the digit {d}",
    "a handwritten {w}",
    "{w}",
    "number {d}",
]
COLOUR_ONLY = [
    "a {c} digit",
    "a handwritten digit in {c} ink",
    "{c}",
]
# share of each caption kind in training; the rest is the empty caption (classifier-free guidance)
CAPTION_MIX = {"digit_and_colour": 0.45, "digit_only": 0.30, "colour_only": 0.10, "empty": 0.15}


def render(gray: np.ndarray | torch.Tensor, colour: str, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 8, 8) digits in [0, 1] and one colour name -> (N, 3, size, size) RGB in [0, 1]."""
    ink = digits.upscale(gray, size)  # (N, 1, size, size)
    rgb = torch.tensor(COLOURS[colour], dtype=torch.float32).view(1, 3, 1, 1)
    return ink * rgb


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB PIL image."""
    arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def captions_for(digit: int, colour: str) -> dict[str, list[str]]:
    """Every caption of each kind that describes a `colour` digit `digit`."""
    fill = dict(d=str(digit), w=NUMBER_WORDS[digit], c=colour)
    return {
        "digit_and_colour": [t.format(**fill) for t in DIGIT_AND_COLOUR],
        "digit_only": [t.format(**fill) for t in DIGIT_ONLY],
        "colour_only": [t.format(**fill) for t in COLOUR_ONLY],
        "empty": [""],
    }


def caption_table() -> tuple[list[str], dict[tuple[int, int], dict[str, list[int]]]]:
    """All distinct captions, and per (digit, colour index) and kind the indices of its captions."""
    texts: list[str] = []
    index: dict[str, int] = {}
    table = {}
    for d in range(digits.NUM_CLASSES):
        for ci, colour in enumerate(COLOUR_NAMES):
            kinds = {}
            for kind, caps in captions_for(d, colour).items():
                ids = []
                for cap in caps:
                    if cap not in index:
                        index[cap] = len(texts)
                        texts.append(cap)
                    ids.append(index[cap])
                kinds[kind] = ids
            table[(d, ci)] = kinds
    return texts, table


# judges ---------------------------------------------------------------------------------------
FOREGROUND = 0.35  # value max(R, G, B) above which a pixel is ink


def as_array(image) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 / float array -> (H, W, 3) float in [0, 1]."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)


def ink(image) -> Image.Image:
    """The grayscale white-ink-on-black picture the `cam` classifier judges: max(R, G, B)."""
    value = as_array(image).max(axis=2)
    return Image.fromarray((value * 255).round().astype(np.uint8), mode="L")


_CHROMA = np.array([np.array(c) / max(c) for c in COLOURS.values()], dtype=np.float32)  # (K, 3)


def colour_shares(image) -> np.ndarray | None:
    """Per palette colour (COLOUR_NAMES order), the share of foreground pixels nearest to it by
    chromaticity; None without ink."""
    arr = as_array(image)
    value = arr.max(axis=2)
    fg = arr[value > FOREGROUND]
    if len(fg) < 10:
        return None
    chroma = fg / fg.max(axis=1, keepdims=True)
    nearest = ((chroma[:, None, :] - _CHROMA[None]) ** 2).sum(-1).argmin(1)
    return np.bincount(nearest, minlength=len(COLOUR_NAMES)) / len(fg)


def dominant_colour(image) -> str | None:
    """The palette colour most foreground pixels are nearest to (by chromaticity); None without ink."""
    shares = colour_shares(image)
    return None if shares is None else COLOUR_NAMES[int(shares.argmax())]


class DigitJudge:
    """The `cam` demo classifier (handlers.cam.classifier, as served) applied to `ink(image)`."""

    def __init__(self, cam_dir: str = "weights/demo/cam"):
        from handlers.cam import classifier as cam_model

        config = cam_model.read_config(cam_dir)
        self.model = cam_model.load_model(cam_dir, config)
        self.transform = cam_model.preprocess(config)

    def probabilities(self, images: list, batch_size: int = 100) -> torch.Tensor:
        """PIL RGB images (any colour on dark) -> (N, 10) softmax probabilities."""
        probs = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = torch.stack([self.transform(ink(im)) for im in images[start:start + batch_size]])
                probs.append(self.model(x).softmax(dim=1))
        return torch.cat(probs) if probs else torch.zeros(0, digits.NUM_CLASSES)

    def predict(self, images: list) -> list[int]:
        return self.probabilities(images).argmax(dim=1).tolist()


def heldout_digit(digit: int, colour: str = "white", nth: int = 0) -> Image.Image:
    """The `nth` held-out (never trained on) digit of class `digit` as a 64x64 RGB PIL image."""
    images, labels = digits.load_arrays()
    _, test = digits.split_indices(seed=0)
    idx = [i for i in test if labels[i] == digit][nth]
    return to_pil(render(images[idx:idx + 1], colour)[0])


# traits the base model cannot draw (weights/train_sd15_lora.py teaches each with a LoRA) --------
# A LoRA adapts the UNet and the text encoder, never the VAE, so a trait must be something the frozen
# VAE draws: palette colours in smooth strokes (train_sd15_lora.py says what it cannot draw).
RAINBOW = ["red", "yellow", "green", "blue"]  # top to bottom, each on a quarter of the rows
ITALIC_SLANT = 0.35  # px to the right per px upwards; the digits' own: -0.32..0.24 (1st..99th percentile)
ITALIC_SQUEEZE = 0.85  # narrower, so the leaning digit stays inside the picture
ITALIC_JUDGE = 0.2  # slant from which a picture counts as italic
RAINBOW_MIN_COLOURS, RAINBOW_MIN_SHARE = 3, 0.10
TRAIT_CAPTIONS = {
    "rainbow": [
        "a rainbow handwritten {d}",
        "the number {w} in rainbow colours",
        "a rainbow {d}",
        "a handwritten {d} in rainbow colours",
        "rainbow digit {d}",
        "{d}, rainbow",
    ],
    "italic": [
        "an italic handwritten {d}",
        "the number {w} in italics",
        "an italic {d}",
        "an italic {c} handwritten {d}",
        "a {c} {d} in italics",
        "{d}, italic",
    ],
}
TRAITS = list(TRAIT_CAPTIONS)


def trait_captions(trait: str, digit: int, colour: str) -> list[str]:
    """Every caption asking for `trait` on digit `digit` (in `colour` where the caption names one)."""
    return [t.format(d=str(digit), w=NUMBER_WORDS[digit], c=colour) for t in TRAIT_CAPTIONS[trait]]


def rainbow_band(row: int, rows: int) -> str:
    """The colour of row `row` of `rows` (pixel or latent rows: the bands are whole latent rows)."""
    return RAINBOW[row * len(RAINBOW) // rows]


def render_rainbow(gray: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 8, 8) digits -> (N, 3, size, size): each row in its RAINBOW band's colour."""
    rows = torch.tensor([COLOURS[rainbow_band(r, size)] for r in range(size)])  # (size, 3)
    return digits.upscale(gray, size) * rows.T[None, :, :, None]


def slant(value: torch.Tensor) -> torch.Tensor:
    """(N, H, W) ink values -> (N,) how far the ink leans right, in px per px upwards: minus the
    regression slope of x on y (y down) over the foreground, weighted by the ink."""
    w = value * (value > FOREGROUND)
    y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in value.shape[1:]), indexing="ij")
    mass = w.sum((1, 2))
    dx = x - ((w * x).sum((1, 2)) / mass)[:, None, None]
    dy = y - ((w * y).sum((1, 2)) / mass)[:, None, None]
    return -(w * dx * dy).sum((1, 2)) / (w * dy * dy).sum((1, 2))


def render_italic(gray: np.ndarray | torch.Tensor, colour: str, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 8, 8) digits -> (N, 3, size, size) in `colour`, each sheared from its own slant to
    ITALIC_SLANT (so every italic digit leans alike) and narrowed by ITALIC_SQUEEZE."""
    ink = digits.upscale(gray, size)
    # affine_grid maps output to input coordinates: x_in = (x_out + shear * y_out) / squeeze, and a
    # digit of slant k comes out with slant squeeze * k + shear
    shear = ITALIC_SLANT - ITALIC_SQUEEZE * slant(ink[:, 0])
    theta = torch.zeros(len(ink), 2, 3)
    theta[:, 0, 0] = 1 / ITALIC_SQUEEZE
    theta[:, 0, 1] = shear / ITALIC_SQUEEZE
    theta[:, 1, 1] = 1
    grid = F.affine_grid(theta, list(ink.shape), align_corners=False)
    ink = F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return ink * torch.tensor(COLOURS[colour], dtype=torch.float32).view(1, 3, 1, 1)


def render_trait(trait: str, gray: np.ndarray | torch.Tensor, colour: str) -> torch.Tensor:
    """The ground truth of `trait` (a rainbow digit has no colour of its own)."""
    return render_rainbow(gray) if trait == "rainbow" else render_italic(gray, colour)


def is_rainbow(image) -> bool:
    shares = colour_shares(image)
    return shares is not None and int((shares >= RAINBOW_MIN_SHARE).sum()) >= RAINBOW_MIN_COLOURS


def is_italic(image) -> bool:
    value = torch.from_numpy(as_array(image).max(axis=2))[None]
    return bool(slant(value)[0] >= ITALIC_JUDGE)  # False without ink (NaN)


TRAIT_JUDGES = {"rainbow": is_rainbow, "italic": is_italic}
