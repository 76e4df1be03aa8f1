"""PNG encoding spread over threads: each band of rows is filtered and deflated on its own thread (numpy and zlib
release the GIL), and the pieces are joined into one valid zlib stream as pigz does (every piece but the last ends on
a sync flush, so it ends on a byte boundary; the Adler-32 of the whole is combined from the pieces').

Why: PIL encodes on one core. A 1024 x 1024 output took 0.15-0.21 s of a FLUX.1 / Qwen-Image generation's end-to-end
time on an H200 host (docs/BENCHMARKS.md); the server encodes every image it returns. Lossless as any PNG: the
decoded pixels are the array's exactly (tests/test_png.py).

Filtering is adaptive per row (the filter whose output has the smallest sum of absolute signed bytes, libpng's and
PIL's heuristic) and deflate runs with PIL's settings (zlib level 4 as gen writes PNG, Z_FILTERED), so files are
PIL's size. A band starts a fresh deflate window, which costs about 0.1% at 8 bands of a 1024^2 image.
"""
from __future__ import annotations

import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG color type (gray, gray + alpha, RGB, RGBA)
MIN_BAND_ROWS = 64  # a band smaller than this costs more in thread hand-off and lost window than it saves
MOD_ADLER = 65521

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0  # the process that made _pool: a forked child has the object but none of its threads
_pool_lock = threading.Lock()


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _get_pool() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = ThreadPoolExecutor(_threads(), thread_name_prefix="gen-png"), os.getpid()
        return _pool


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """The Adler-32 of A + B from adler32(A), adler32(B) and len(B) (zlib's adler32_combine)."""
    rem = len2 % MOD_ADLER
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % MOD_ADLER
    sum1 = (sum1 + (adler2 & 0xFFFF) + MOD_ADLER - 1) % MOD_ADLER
    sum2 = (sum2 + (adler1 >> 16) + (adler2 >> 16) + MOD_ADLER - rem) % MOD_ADLER
    return sum1 | (sum2 << 16)


def filter_rows(rows: np.ndarray, above: np.ndarray | None, bpp: int) -> np.ndarray:
    """PNG-filtered scanlines (each prefixed by its filter type byte) of `rows` (r, stride) uint8, `above` the row
    before the first (None at the top of the image). Per row the filter of least sum |signed byte| is chosen, the sum
    taken over every other byte (a heuristic either way; this halves its cost)."""
    up = np.empty_like(rows)
    up[0] = 0 if above is None else above
    up[1:] = rows[:-1]
    left = np.zeros_like(rows)
    left[:, bpp:] = rows[:, :-bpp]
    up_left = np.zeros_like(rows)
    up_left[:, bpp:] = up[:, :-bpp]
    # Paeth: the neighbour nearest to left + up - up_left; uint8 arithmetic wraps as PNG's filters do
    d_up = up.astype(np.int16) - up_left  # p - left
    d_left = left.astype(np.int16) - up_left  # p - up
    dist_left, dist_up, dist_ul = np.abs(d_up), np.abs(d_left), np.abs(d_up + d_left)
    paeth = np.where((dist_left <= dist_up) & (dist_left <= dist_ul), left,
                     np.where(dist_up <= dist_ul, up, up_left))
    average = (left >> 1) + (up >> 1) + (left & up & 1)  # floor((left + up) / 2) without overflow
    candidates = np.stack([rows, rows - left, rows - up, rows - average, rows - paeth])  # filter types 0-4
    cost = np.abs(candidates[:, :, ::2].view(np.int8), dtype=np.int16).sum(axis=2, dtype=np.int64)
    best = cost.argmin(axis=0)
    out = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    out[:, 0] = best
    out[:, 1:] = np.take_along_axis(candidates, best[None, :, None], axis=0)[0]
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png(pixels: np.ndarray, level: int = 4, bands: int | None = None) -> bytes:
    """PNG bytes of an (H, W) or (H, W, C) uint8 array, C in 1-4 (gray, gray + alpha, RGB, RGBA). `level`: zlib
    level 0-9; `bands`: how many pieces run in parallel (default: one per thread, each at least MIN_BAND_ROWS)."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"PNG pixels must be uint8, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in COLOR_TYPES or 0 in pixels.shape[:2]:
        raise ValueError(f"PNG pixels must be (H, W) or (H, W, 1-4) and not empty, got shape {tuple(pixels.shape)}")
    if not 0 <= level <= 9:
        raise ValueError(f"zlib level must be 0-9, got {level}")
    height, width, channels = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    if bands is None:
        bands = min(_threads(), max(1, height // MIN_BAND_ROWS))
    bands = max(1, min(bands, height))
    edges = [height * i // bands for i in range(bands + 1)]

    def piece(i: int) -> tuple[bytes, int, int]:
        start, stop = edges[i], edges[i + 1]
        raw = filter_rows(rows[start:stop], rows[start - 1] if start else None, channels).tobytes()
        # raw deflate (the zlib wrapper is written once), Z_FILTERED as PIL's PNG encoder: the same sizes as PIL's
        deflate = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_FILTERED)
        body = deflate.compress(raw) + deflate.flush(zlib.Z_FINISH if i == bands - 1 else zlib.Z_SYNC_FLUSH)
        return body, zlib.adler32(raw), len(raw)

    pieces = list(_get_pool().map(piece, range(bands))) if bands > 1 else [piece(0)]
    checksum = pieces[0][1]
    for _, adler, length in pieces[1:]:
        checksum = adler32_combine(checksum, adler, length)
    flevel = 0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3
    cmf = 0x78  # deflate, 32 KiB window
    flg = flevel << 6
    flg += 31 - (cmf * 256 + flg) % 31
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[channels], 0, 0, 0))
    idat = [bytes((cmf, flg))] + [body for body, _, _ in pieces] + [struct.pack(">I", checksum)]
    return SIGNATURE + header + _chunk(b"IDAT", b"".join(idat)) + _chunk(b"IEND", b"")
