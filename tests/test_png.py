"""gen/png.py: PNG encoded in bands on threads decodes to the same pixels, at PIL's size."""
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from gen.png import adler32_combine, encode_png
from gen.types import GenerationResult, image_bytes


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like image: smooth gradients and waves plus a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(x / 37 + y / 53), 128 + 90 * np.cos(x / 91) * np.sin(y / 17),
                    255 * (x + y) / (h + w)], -1)
    return (img + rng.integers(-3, 4, img.shape)).clip(0, 255).astype(np.uint8)


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


@pytest.mark.parametrize("bands", [1, 2, 3, 8, 1000])
def test_bands_decode_to_the_same_pixels(bands):
    rng = np.random.default_rng(bands)
    for pixels in (_smooth(257, 131), rng.integers(0, 256, (97, 45, 3), dtype=np.uint8)):
        assert np.array_equal(_decode(encode_png(pixels, bands=bands)), pixels)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_every_channel_count_and_odd_shapes(channels):
    rng = np.random.default_rng(channels)
    for h, w in ((1, 1), (1, 37), (70, 1), (70, 33)):
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        back = _decode(encode_png(pixels, bands=3))
        assert np.array_equal(back.reshape(pixels.shape), pixels)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    assert np.array_equal(_decode(encode_png(gray)), gray)


def test_every_filter_type_is_used_and_right():
    """Rows that favour each of the five filters (flat, horizontal ramp, vertical ramp, both, noise): whichever is
    chosen, the decoder must rebuild the pixels."""
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w]
    rows = [np.full((h, w), 77), (x * 3) % 256, (y * 5) % 256, (x * 2 + y * 3) % 256,
            np.random.default_rng(0).integers(0, 256, (h, w))]
    pixels = np.concatenate([np.stack([r, (r * 7) % 256, 255 - r], -1) for r in rows]).astype(np.uint8)
    data = encode_png(pixels, bands=1)
    raw = zlib.decompress(data[data.index(b"IDAT") + 4:])
    types = {raw[i * (w * 3 + 1)] for i in range(len(rows) * h)}
    assert types >= {1, 2} and len(types) >= 3, types
    assert np.array_equal(_decode(data), pixels)


def test_adler32_combine_equals_zlib_on_the_whole():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    for cut in (0, 1, 65520, 65521, 65522, 200_000, len(data)):
        a, b = data[:cut], data[cut:]
        assert adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(data)
    ones = b"\xff" * 500_000  # sums near the modulus
    assert adler32_combine(zlib.adler32(ones), zlib.adler32(ones), len(ones)) == zlib.adler32(ones + ones)


def test_size_is_pils_at_the_same_level():
    pixels = _smooth(512, 512)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=4)
    ours = len(encode_png(pixels, level=4, bands=1))
    assert 0.9 < ours / len(buf.getvalue()) < 1.01, (ours, len(buf.getvalue()))  # PIL's size or a little less
    assert len(encode_png(pixels, level=4, bands=8)) / ours < 1.01


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(4, 4, 5\)"):
        encode_png(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\(0, 4, 3\)"):
        encode_png(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="got 10"):
        encode_png(np.zeros((4, 4, 3), np.uint8), level=10)
    with pytest.raises(ValueError, match="'GIF'"):
        image_bytes(Image.new("RGB", (4, 4)), "gif")


def test_outputs_go_through_it(tmp_path):
    pixels = _smooth(64, 80)
    image = Image.fromarray(pixels)
    assert image_bytes(image, "png") == encode_png(pixels)
    path = GenerationResult(seed=0, images=[image]).save(tmp_path / "out.png")
    assert np.array_equal(_decode(path.read_bytes()), pixels)
    rgba = Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 9, np.uint8)]))
    assert np.array_equal(_decode(image_bytes(rgba, "png")), pixels)  # outputs are written as RGB
    jpeg = _decode(image_bytes(image, "jpeg", 90))
    assert jpeg.shape == pixels.shape and np.abs(jpeg.astype(int) - pixels).mean() < 4


def test_to_pil_rounds_as_diffusers_image_processor():
    """stages.decode.to_pil converts to uint8 where the tensor is; the pixels equal diffusers' numpy path (float32
    x 255, round half to even), also at the .5 boundaries."""
    import torch

    from stages.decode import to_pil

    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 33, 40, generator=g) * 2.4 - 1.2  # some values outside [-1, 1]: clamped
    edges = (torch.arange(256, dtype=torch.float32) + 0.5) / 255 * 2 - 1  # k.5 / 255 in [-1, 1] units
    images[0, 0, 0, :40] = edges[:40]
    images[1, 2, 5, :40] = edges[200:240]
    for dtype in (torch.float32, torch.bfloat16):
        x = images.to(dtype)
        ref = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # diffusers' postprocess (numpy)
        ref = (ref * 255).round().astype(np.uint8)
        ours = np.stack([np.asarray(im) for im in to_pil(x)])
        assert ours.dtype == np.uint8 and np.array_equal(ours, ref)


def test_a_forked_child_gets_threads_of_its_own():
    """The band pool made before a fork has no threads in the child: the child makes its own (no hang)."""
    import multiprocessing as mp

    pixels = _smooth(256, 64)
    encode_png(pixels, bands=4)  # the parent's pool exists now
    ctx = mp.get_context("fork")
    child = ctx.Process(target=_encode_in_child, args=(pixels,))
    child.start()
    child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0


def _encode_in_child(pixels):
    data = encode_png(pixels, bands=4)
    raise SystemExit(0 if np.array_equal(_decode(data), pixels) else 3)
