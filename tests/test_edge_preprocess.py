"""Property tests of the one preprocessing: any size and mode -> (H, W, 3) float32 in [-1, 1]."""

import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edge_runtime.preprocess import _RESAMPLE, Preprocessing, preprocess, resize

MODES = {"L": (np.uint8, 1), "LA": (np.uint8, 2), "P": (np.uint8, 1), "RGBA": (np.uint8, 4),
         "CMYK": (np.uint8, 4), "I;16": (np.uint16, 1), "RGB": (np.uint8, 3)}


def encode(mode: str, pixels: np.ndarray) -> bytes:
    height, width = pixels.shape[:2]
    if mode == "P":
        im = Image.frombytes("L", (width, height), pixels.tobytes()).convert("P")
    else:  # I;16 is little-endian 16-bit, as the native array on the machines we test on
        im = Image.frombytes(mode, (width, height), pixels.astype(pixels.dtype.newbyteorder("<")).tobytes())
    out = io.BytesIO()
    im.save(out, format="TIFF" if mode == "CMYK" else "PNG")
    return out.getvalue()


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(sorted(MODES)), width=st.integers(1, 48), height=st.integers(1, 48),
       out_w=st.integers(1, 32), out_h=st.integers(1, 32), seed=st.integers(0, 2**16),
       resample=st.sampled_from(["bilinear", "bicubic", "nearest", "area"]))
def test_any_size_and_mode_gives_model_input(mode, width, height, out_w, out_h, seed, resample):
    dtype, channels = MODES[mode]
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, np.iinfo(dtype).max, (height, width, channels), dtype=np.int64, endpoint=True).astype(dtype)
    x = preprocess(encode(mode, pixels), Preprocessing(height=out_h, width=out_w, resample=resample))
    assert x.shape == (out_h, out_w, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(["I;16", "I;16B"]), top=st.sampled_from([255, 4095, 65535]),
       width=st.integers(1, 24), height=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_16_bit_images_scale_by_their_bit_depth_not_their_brightest_pixel(mode, top, width, height, seed):
    # A dark 16-bit frame (every value <= 255) must stay dark, not be read as an 8-bit image.
    pixels = np.random.default_rng(seed).integers(0, top, (height, width), endpoint=True).astype(np.uint16)
    order = "<" if mode == "I;16" else ">"
    im = Image.frombytes(mode, (width, height), pixels.astype(np.dtype(np.uint16).newbyteorder(order)).tobytes())
    out = io.BytesIO()
    im.save(out, format="PNG" if mode == "I;16" else "TIFF")
    assert Image.open(io.BytesIO(out.getvalue())).mode == mode  # decoded as 16-bit, the case under test
    x = preprocess(out.getvalue(), Preprocessing(height=height, width=width, resample="nearest"))
    expected = (np.round(pixels / 65535 * 255) - 127.5) / 127.5
    np.testing.assert_allclose(x, np.repeat(expected[..., None], 3, axis=2), atol=1e-6)
    if top == 255:
        assert x.max() <= -1 + 1 / 127.5 + 1e-6  # near black


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 48), height=st.integers(1, 48), out_w=st.integers(1, 32), out_h=st.integers(1, 32),
       seed=st.integers(0, 2**16), resample=st.sampled_from(["bilinear", "bicubic", "nearest", "area"]),
       gray=st.booleans())
def test_a_gray_image_resized_as_one_band_gives_pillows_rgb_resize_exactly(width, height, out_w, out_h, seed,
                                                                             resample, gray):
    # The gray shortcut of `resize` must not change a pixel: training and the device rely on it.
    rng = np.random.default_rng(seed)
    band = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
    pixels = np.repeat(band, 3, axis=2) if gray else rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if not gray and height * width > 1:
        pixels[0, 0] = (0, 1, 2)  # at least one colored pixel
    im = Image.fromarray(pixels, "RGB")
    prep = Preprocessing(height=out_h, width=out_w, resample=resample)
    expected = np.asarray(im.resize((out_w, out_h), _RESAMPLE[resample]))
    got = resize(im, prep)
    assert got.shape == (out_h, out_w, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def test_a_large_gray_image_is_resized_as_rgb_within_the_memory_budget(monkeypatch):
    # Above _GRAY_CHECK_PIXELS the three bands are not split out (memory): the same pixels anyway.
    from edge_runtime import preprocess as module

    monkeypatch.setattr(module, "_GRAY_CHECK_PIXELS", 15)
    split = []
    monkeypatch.setattr(module, "_gray_band", lambda im: split.append(im.size) or None)
    band = np.random.default_rng(0).integers(0, 256, (4, 4, 1), dtype=np.uint8)
    for side in (3, 4):  # 9 pixels: checked; 16: not
        im = Image.fromarray(np.repeat(band[:side, :side], 3, axis=2), "RGB")
        resize(im, Preprocessing(height=2, width=2))
    assert split == [(3, 3)]
