"""handlers.core.images.decode_image on images as people send them: EXIF-rotated JPEGs, 16-bit and
float images, transparency. Each is compared with the plain 8-bit PNG of the same picture."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from handlers.core.errors import RequestError
from handlers.core.images import decode_image
from harness.context import run_batch
from weights import digits

BLACK = (0, 0, 0)
LIMIT = 16_000_000
SIZE = 64


@pytest.fixture(scope="module")
def heldout():
    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    return images[test[:10]], labels[test[:10]]


@pytest.fixture(scope="module")
def pictures(heldout):
    """Three held-out digits as 8-bit grayscale PIL images (white ink on black)."""
    return [digits.to_pil(im, SIZE) for im in heldout[0][:3]]


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def plain(img: Image.Image, mode: str = "L") -> np.ndarray:
    return arr(decode_image(save(img, "PNG"), "image", LIMIT, mode, background=BLACK))


def png16(samples: np.ndarray, color_type: int, trns: bytes | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB / RGBA / grey+alpha):
    samples uint16 (H, W) for grey (0) or (H, W, C) for RGB (2), grey+alpha (4), RGBA (6)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = samples.shape[:2]
    raw = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
    if trns is not None:
        out += chunk(b"tRNS", trns)
    return out + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# The transposition that stores a picture so that EXIF orientation n displays it upright
# (the inverse of what a viewer applies).
STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def exif_jpeg(img: Image.Image, orientation: int, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(img.transpose(STORE[orientation]), "JPEG", exif=exif, quality=95, **kw)


# --------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("colour", ["L", "RGB"])
def test_exif_orientation_is_applied(pictures, orientation, colour):
    for pic in pictures:
        data = exif_jpeg(pic.convert(colour), orientation)
        with Image.open(io.BytesIO(data)) as stored:
            assert stored.getexif()[0x0112] == orientation
            assert stored.size == pic.transpose(STORE[orientation]).size
            as_pillow_shows_it = arr(ImageOps.exif_transpose(stored).convert("L"))
        got = arr(decode_image(data, "image", LIMIT, "L", background=BLACK))
        want = plain(pic)
        assert got.shape == want.shape
        assert np.array_equal(got, as_pillow_shows_it)  # same as ImageOps.exif_transpose
        assert np.abs(got - want).mean() < 2 and np.abs(got - want).max() < 40  # JPEG error only
        # ... and the test means something: the stored pixels are far from the picture.
        if orientation in (3, 6, 8):
            assert np.abs(arr(Image.open(io.BytesIO(data)).convert("L")) - want).mean() > 10


def test_jpeg_without_orientation_and_with_orientation_1(pictures):
    exif = Image.Exif()
    exif[0x0112] = 1
    for data in (save(pictures[0], "JPEG", quality=95), save(pictures[0], "JPEG", quality=95, exif=exif)):
        got = arr(decode_image(data, "image", LIMIT, "L", background=BLACK))
        assert np.abs(got - plain(pictures[0])).mean() < 2


def test_pixel_limit_is_rotation_invariant(pictures):
    wide = pictures[0].resize((80, 40))
    data = exif_jpeg(wide, 6)  # stored 40x80, shown 80x40
    assert decode_image(data, "image", 3200, "L", background=BLACK).size == (40, 80)[::-1]
    with pytest.raises(RequestError, match="more pixels than the limit of 3199"):
        decode_image(data, "image", 3199, "L", background=BLACK)


# --------------------------------------------------------------------------- deep images


def test_16bit_grey_png(pictures):
    for pic in pictures:
        a16 = np.asarray(pic).astype(np.uint16) * 257  # the same picture at full 16-bit range
        data = save(Image.fromarray(a16), "PNG")
        with Image.open(io.BytesIO(data)) as raw:
            assert raw.mode == "I;16"  # what Pillow 13 gives for a 16-bit grey PNG
            assert np.asarray(raw.convert("L")).max() == 255  # Pillow's own convert clips
        assert np.array_equal(plain(pic), arr(decode_image(data, "image", LIMIT, "L", background=BLACK)))
        rgb = arr(decode_image(data, "image", LIMIT, "RGB", background=BLACK))
        assert np.array_equal(plain(pic, "RGB"), rgb)


def test_16bit_grey_is_scaled_not_clipped():
    ramp = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)  # 0, 256, ... 65280
    got = np.asarray(decode_image(png16(ramp, 0), "image", LIMIT, "L", background=BLACK))
    assert np.array_equal(got, (ramp >> 8).astype(np.uint8))  # 0..255, every level once


@pytest.mark.parametrize("mode", ["I;16B", "I;16", "I"])
def test_16bit_grey_tiff_and_pgm(pictures, mode):
    pic = pictures[1]
    a16 = np.asarray(pic).astype(np.uint16) * 257
    if mode == "I":  # Pillow reads a 16-bit PGM as mode I
        data = b"P5\n%d %d\n65535\n" % pic.size + a16.astype(">u2").tobytes()
    elif mode == "I;16B":
        data = save(Image.frombytes("I;16B", pic.size, a16.astype(">u2").tobytes()), "TIFF")
    else:
        data = save(Image.fromarray(a16), "TIFF")
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == mode
    assert np.array_equal(plain(pic), arr(decode_image(data, "image", LIMIT, "L", background=BLACK)))


def test_16bit_rgb_png(pictures):
    for pic in pictures:
        rgb8 = np.asarray(pic.convert("RGB")).astype(np.uint16)
        data = png16(rgb8 * 257, 2)
        with Image.open(io.BytesIO(data)) as raw:
            assert raw.mode == "RGB"  # Pillow reads 16-bit RGB as its high bytes
        assert np.array_equal(plain(pic), arr(decode_image(data, "image", LIMIT, "L", background=BLACK)))


def test_float_tiff(pictures):
    for pic in pictures:
        f = np.asarray(pic).astype(np.float32) / 255
        data = save(Image.fromarray(f, mode="F"), "TIFF")
        with Image.open(io.BytesIO(data)) as raw:
            assert raw.mode == "F"
            assert np.asarray(raw.convert("L")).max() <= 1  # Pillow's own convert clips to 0/1
        assert np.array_equal(plain(pic), arr(decode_image(data, "image", LIMIT, "L", background=BLACK)))


@pytest.mark.parametrize("values", [[0.0, 2.0], [-0.5, 1.0], [0.0, float("nan")]])
def test_float_outside_0_1_is_refused(values):
    f = np.array([values * 8] * 4, dtype=np.float32)
    with pytest.raises(RequestError, match="'image' is a floating-point image with values outside 0..1"):
        decode_image(save(Image.fromarray(f, mode="F"), "TIFF"), "image", LIMIT, "L", background=BLACK)


def test_32bit_integer_is_refused():
    data = save(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)), "TIFF")
    with pytest.raises(RequestError, match="'image' is a 32-bit integer image"):
        decode_image(data, "image", LIMIT, "L", background=BLACK)


# --------------------------------------------------------------------------- transparency


def garbage(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def test_rgba_transparent_background(pictures):
    for pic in pictures:
        ink = np.asarray(pic)
        # White ink whose opacity is the ink; under the transparent part, random colours.
        rgb = np.where(ink[..., None] > 0, 255, garbage(ink.shape + (3,))).astype(np.uint8)
        data = save(Image.fromarray(np.dstack([rgb, ink]), mode="RGBA"), "PNG")
        got = arr(decode_image(data, "image", LIMIT, "L", background=BLACK))
        assert np.array_equal(plain(pic), got)
        # Dropping alpha (what a plain convert does) would show the garbage.
        assert np.abs(arr(Image.open(io.BytesIO(data)).convert("L")) - plain(pic)).mean() > 30


def test_rgba_flattened_on_the_callers_background():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[0, 1] = (200, 0, 0, 0)  # fully transparent red
    rgba[1, 0] = (255, 255, 255, 128)  # half-transparent white
    data = save(Image.fromarray(rgba, mode="RGBA"), "PNG")
    white = np.asarray(decode_image(data, "image", LIMIT, "RGB", background=(255, 255, 255)))
    assert white[0, 0].tolist() == [10, 20, 30] and white[0, 1].tolist() == [255, 255, 255]
    assert white[1, 0].tolist() == [255, 255, 255]
    green = np.asarray(decode_image(data, "image", LIMIT, "RGB", background=(0, 255, 0)))
    assert green[0, 1].tolist() == [0, 255, 0] and green[1, 0].tolist() == [128, 255, 128]
    grey = np.asarray(decode_image(data, "image", LIMIT, "L", background=(0, 255, 0)))
    assert grey[0, 1] == Image.new("RGB", (1, 1), (0, 255, 0)).convert("L").getpixel((0, 0))  # luminance


def test_la_transparent_background(pictures):
    for pic in pictures:
        ink = np.asarray(pic)
        grey = np.where(ink > 0, 255, garbage(ink.shape)).astype(np.uint8)
        data = save(Image.fromarray(np.dstack([grey, ink]), mode="LA"), "PNG")
        assert np.array_equal(plain(pic), arr(decode_image(data, "image", LIMIT, "L", background=BLACK)))


def test_16bit_grey_alpha_png(pictures):
    pic = pictures[0]
    ink = np.asarray(pic).astype(np.uint16)
    grey = np.where(ink > 0, 255, garbage(ink.shape)).astype(np.uint16)
    data = png16(np.dstack([grey * 257, ink * 257]), 4)
    assert np.array_equal(plain(pic), arr(decode_image(data, "image", LIMIT, "L", background=BLACK)))


def test_palette_png_with_transparent_index(pictures):
    for pic in pictures:
        ink = np.asarray(pic)
        # Background pixels (ink 0) use palette index 0, which is red and transparent.
        pal = pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
        idx = np.where(ink == 0, 0, np.asarray(pal).astype(np.int16) + 1).astype(np.uint8)
        img = Image.fromarray(idx, mode="P")
        img.putpalette([255, 0, 0] + pal.getpalette()[: 255 * 3])
        data = save(img, "PNG", transparency=0)
        with Image.open(io.BytesIO(data)) as raw:
            assert raw.mode == "P" and raw.info["transparency"] == 0
            opaque = arr(raw.convert("L"))
        want = np.where(ink == 0, 0, opaque)  # the palette's greys, background black
        got = arr(decode_image(data, "image", LIMIT, "L", background=BLACK))
        assert np.array_equal(want, got)
        assert np.abs(got - plain(pic)).max() <= 2  # adaptive palette rounding only


def test_grey_png_with_trns_colour(pictures):
    pic = pictures[2]
    ink = np.asarray(pic)
    key = int(np.setdiff1d(np.arange(1, 256), ink)[0])  # a grey the picture does not use
    grey = np.where(ink == 0, key, ink).astype(np.uint8)  # background stored as `key`, transparent
    data = save(Image.fromarray(grey, mode="L"), "PNG", transparency=key)
    assert np.array_equal(plain(pic), arr(decode_image(data, "image", LIMIT, "L", background=BLACK)))
    a16 = grey.astype(np.uint16) * 257
    data16 = png16(a16, 0, trns=struct.pack(">H", key * 257))
    assert np.array_equal(plain(pic), arr(decode_image(data16, "image", LIMIT, "L", background=BLACK)))


def test_rgb_png_with_trns_colour_8_and_16_bit(pictures):
    pic = pictures[0]
    ink = np.asarray(pic)
    rgb = np.dstack([ink] * 3)
    rgb[ink == 0] = (0, 200, 0)
    data = save(Image.fromarray(rgb, mode="RGB"), "PNG", transparency=(0, 200, 0))
    assert np.array_equal(plain(pic), arr(decode_image(data, "image", LIMIT, "L", background=BLACK)))
    data16 = png16(rgb.astype(np.uint16) * 257, 2, trns=struct.pack(">HHH", 0, 200 * 257, 0))
    assert np.array_equal(plain(pic), arr(decode_image(data16, "image", LIMIT, "L", background=BLACK)))


def test_background_is_required_and_checked():
    data = save(Image.new("L", (4, 4)), "PNG")
    with pytest.raises(TypeError):
        decode_image(data, "image", LIMIT, "L")  # noqa - every caller says what its model expects
    for bad in [(0, 0), (0, 0, 256), (0.5, 0, 0), "white"]:
        with pytest.raises(ValueError):
            decode_image(data, "image", LIMIT, "L", background=bad)


# --------------------------------------------------------------------------- unchanged behaviour


def test_errors_name_the_field(pictures):
    good = save(pictures[0], "PNG")
    cases = {
        b"": "'mask' is empty",
        b"not an image": "'mask' is not an image in a known format",
        good[: len(good) // 2]: "'mask' is not a decodable image",
    }
    for data, message in cases.items():
        with pytest.raises(RequestError, match=message) as exc:
            decode_image(data, "mask", LIMIT, "L", background=BLACK)
        assert exc.value.field == "mask" and exc.value.status == 400
    with pytest.raises(RequestError, match=r"'mask' has more pixels than the limit of 100 \(64x64 = 4096\)"):
        decode_image(good, "mask", 100, "L", background=BLACK)


# --------------------------------------------------------------------------- the cam handler


def test_cam_predicts_the_same_for_every_encoding(cam_handler, heldout):
    """Ten held-out digits: EXIF-rotated JPEG, 16-bit PNG and RGBA with a transparent background
    must get the top-1 prediction of the 8-bit PNG (before: 1/10, 1/10 and garbage)."""
    handler, ctx = cam_handler
    pics = [digits.to_pil(im, SIZE) for im in heldout[0]]

    def top1(bodies: list[bytes]) -> list[int]:
        outs = [json.loads(o) for o in run_batch(handler, ctx, [{"body": b} for b in bodies])]
        return [o["predictions"][0]["index"] for o in outs]

    reference = top1([save(p, "PNG") for p in pics])
    assert np.mean(np.array(reference) == heldout[1]) >= 0.9
    rgba = []
    for i, p in enumerate(pics):
        ink = np.asarray(p)
        rgb = np.where(ink[..., None] > 0, 255, garbage(ink.shape + (3,), seed=i)).astype(np.uint8)
        rgba.append(save(Image.fromarray(np.dstack([rgb, ink]), mode="RGBA"), "PNG"))
    variants = {
        "exif jpeg 6": [exif_jpeg(p.convert("RGB"), 6) for p in pics],
        "exif jpeg 3": [exif_jpeg(p, 3) for p in pics],
        "exif jpeg 8": [exif_jpeg(p.convert("RGB"), 8) for p in pics],
        "16-bit png": [save(Image.fromarray(np.asarray(p).astype(np.uint16) * 257), "PNG") for p in pics],
        "rgba png": rgba,
    }
    for what, bodies in variants.items():
        assert top1(bodies) == reference, what
