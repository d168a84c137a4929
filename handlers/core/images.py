"""Images as people send them, and images back: base64 / data URLs, decoding with limits,
PNG encoding, tensors to PIL. Every handler decodes and encodes images through this module.

`decode_image` returns what the picture looks like, in the 8-bit mode the model wants:
* EXIF orientation (JPEG, PNG eXIf, WebP, TIFF) is applied, as viewers do: phone photos store
  their pixels rotated and say so in the tag.
* Deeper images are scaled to 8 bits by their bit depth, never clipped: 16-bit (PNG, TIFF, PGM;
  Pillow gives I;16 / I;16B / I;16L, or I) keeps its high byte (v >> 8), the same as Pillow
  itself does for 16-bit RGB and RGBA, which it only reads truncated to 8-bit RGB / RGBA.
  32-bit float (F, e.g. float TIFF) is taken as 0..1 (v * 255, rounded). A value the depth
  cannot hold (I outside 0..65535, F outside 0..1, NaN) is a 400: no guessing of a range.
* Transparency (RGBA, LA, PA, RGBa, La, and P / L / RGB / 16-bit grey with a tRNS colour) is
  composited onto the caller's `background` colour, never dropped: the colour hidden under
  transparent pixels is arbitrary. Each model says what it was trained on (the cam demo digits
  are white ink on black: black; ImageNet-style photos: white).
"""
from __future__ import annotations

import base64
import binascii
import io
import zlib

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from handlers.core.errors import RequestError

# Truncated uploads must fail loudly instead of being padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

EXIF_ORIENTATION = 0x0112
# The transposition that shows the stored pixels upright, per EXIF orientation value
# (the same table as PIL.ImageOps.exif_transpose).
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def decode_base64(value: str, name: str) -> bytes:
    if "," in value[:100] and value.startswith("data:"):
        value = value.split(",", 1)[1]  # accept data: URLs as browsers produce them
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(name, f"'{name}' is not valid base64") from None


def decode_image(data: bytes | str, name: str, max_pixels: int, mode: str = "RGB", *,
                 background: tuple[int, int, int] | list[int]) -> Image.Image:
    """Bytes or base64 -> a fully decoded PIL image in `mode` ("RGB" or "L"), as it is displayed.

    The pixel count is checked from the header before any pixel is decoded, so a decompression
    bomb costs nothing (w * h does not change with the EXIF rotation); truncated or undecodable
    data gives a 400 naming the field. EXIF orientation is applied, 16-bit and float images are
    scaled to 8 bits by their depth, and transparent pixels are composited onto `background`
    (an RGB colour; for an "L" result, its luminance): see the module docstring.
    """
    background = _check_background(background)
    if isinstance(data, str):
        data = decode_base64(data, name)
    if not data:
        raise RequestError(name, f"'{name}' is empty")
    too_big = f"'{name}' has more pixels than the limit of {max_pixels}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise RequestError(name, f"{too_big} ({w}x{h} = {w * h})")
            rawmode = _rawmode(img)  # the stored sample layout; gone once loaded
            img.load()
            orientation = _orientation(img)
            flat = _flatten(_to_8bit(img, name, rawmode), background).convert(mode)
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise RequestError(name, f"{too_big} (decompression bomb)") from None
    except UnidentifiedImageError:
        raise RequestError(name, f"'{name}' is not an image in a known format (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RequestError(name, f"'{name}' is not a decodable image: {exc}") from None
    if orientation in ORIENTATION_TRANSPOSE:
        flat = flat.transpose(ORIENTATION_TRANSPOSE[orientation])
    return flat


def _check_background(background) -> tuple[int, int, int]:
    bg = tuple(background)
    if len(bg) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in bg):
        raise ValueError(f"background must be an RGB colour of three ints 0..255, not {background!r}")
    return bg


def _rawmode(img: Image.Image) -> str:
    """The decoder's raw mode of the first tile ('RGB;16B' for a 16-bit RGB PNG), or ''."""
    if not img.tile:
        return ""
    args = img.tile[0].args
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright); unreadable EXIF counts as upright, as in browsers."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
        return int(value)
    except Exception:  # noqa: BLE001 - malformed EXIF in an otherwise good image
        return 1


def _to_8bit(img: Image.Image, name: str, rawmode: str) -> Image.Image:
    """16-bit and float images -> L (LA when a tRNS grey marks transparent pixels), by bit depth.

    Pillow's own convert() clips them instead (I;16 / I -> L is min(v, 255), F -> L too), which
    turns a 16-bit picture white and a 0..1 float picture black.
    """
    if img.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img)  # uint16 (I;16B: big-endian uint16, same values) or int32 for I
        if img.mode == "I":  # 16-bit PGM, older Pillow's 16-bit PNG; 32-bit integer TIFF
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise RequestError(name, f"'{name}' is a 32-bit integer image (values {arr.min()}.."
                                         f"{arr.max()}); send an 8- or 16-bit image")
            arr = arr.astype(np.uint16)
        grey = (arr >> 8).astype(np.uint8)
        key = img.info.get("transparency")
        if isinstance(key, int):  # tRNS of a 16-bit grey PNG: a 16-bit value
            alpha = np.where(arr == key, 0, 255).astype(np.uint8)
            return Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA")
        return Image.fromarray(grey, mode="L")
    if img.mode == "F":
        arr = np.asarray(img)  # float32
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= -1e-3 and arr.max() <= 1 + 1e-3):
            finite = arr[np.isfinite(arr)]
            span = f"{finite.min():g}..{finite.max():g}" if finite.size else "none finite"
            raise RequestError(name, f"'{name}' is a floating-point image with values outside 0..1 ({span}"
                                     f"{', and NaN or inf' if finite.size < arr.size else ''}); send floats in "
                                     "0..1 or an 8- or 16-bit image")
        return Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8), mode="L")
    key = img.info.get("transparency")
    if img.mode == "RGB" and isinstance(key, tuple) and ";16" in rawmode:
        # Pillow reads a 16-bit RGB PNG as its high bytes but keeps the 16-bit tRNS colour, which
        # then matches nothing: compare high bytes (the exact 16-bit colour is no longer known).
        img.info["transparency"] = tuple(int(v) >> 8 for v in key)
    return img


def _flatten(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite an image with any transparency onto an opaque `background`; others unchanged."""
    if img.mode not in ALPHA_MODES and "transparency" not in img.info:
        return img
    rgba = img.convert("RGBA")  # applies tRNS colours / palette alpha too
    return Image.alpha_composite(Image.new("RGBA", img.size, (*background, 255)), rgba).convert("RGB")


def encode_png(img: Image.Image, compress_level: int = 6, strategy: int = zlib.Z_DEFAULT_STRATEGY,
               pnginfo: PngInfo | None = None) -> bytes:
    """`compress_level`: zlib's 0-9; 6 is PIL's default. `strategy`: zlib's (Pillow's `compress_type`),
    e.g. zlib.Z_RLE, which looks for runs only. `pnginfo`: text chunks (handlers/core/provenance.py)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level, compress_type=strategy, pnginfo=pnginfo)
    return buf.getvalue()


def b64_png(img: Image.Image, compress_level: int = 6, strategy: int = zlib.Z_DEFAULT_STRATEGY,
            pnginfo: PngInfo | None = None) -> str:
    return base64.b64encode(encode_png(img, compress_level, strategy, pnginfo)).decode("ascii")


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) floats in [0, 1] -> PIL images (L for 1 channel, RGB for 3)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a, mode="RGB") for a in arr]
