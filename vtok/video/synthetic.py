"""Videos written with PyAV for tests, benchmarks and demos: moving shapes, optionally a frozen stretch and a scene cut.

``write_video(path, frames=48, size=(96, 128), freeze_from=24, cut_at=None)`` returns the exact RGB frames it encoded
(``uint8 [T, H, W, 3]``), so decoders can be checked pixel by pixel within codec tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_frames(frames: int, size: tuple[int, int] = (96, 128), *, freeze_from: int | None = None,
                cut_at: int | None = None, pan: int = 0, seed: int = 0) -> np.ndarray:
    """``uint8 [T, H, W, 3]``: a textured background with three moving coloured shapes. From ``freeze_from`` on every
    frame repeats frame ``freeze_from − 1`` (a frozen stretch); from ``cut_at`` on the scene changes (another
    background and palette: a scene cut); ``pan`` pixels per frame scrolls the background (a camera pan: every patch
    changes). Smooth content, so a codec keeps it close."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    scenes = []
    for _ in range(2):
        fx, fy, ph = rng.uniform(1, 3, 2).tolist() + [rng.uniform(0, 6.28)]
        base = np.stack([np.sin(xx / w * fx * 6.28 + ph + c) * np.cos(yy / h * fy * 6.28 + c) for c in range(3)], -1)
        scenes.append(((base * 0.5 + 0.5) * 160 + 40, rng.uniform(30, 225, (3, 3))))
    shapes = rng.uniform(0, 1, (3, 4))  # x, y, vx, vy
    out = np.empty((frames, h, w, 3), dtype=np.uint8)
    for t in range(frames):
        if freeze_from is not None and 0 < freeze_from <= t:
            out[t] = out[freeze_from - 1]
            continue
        scene = 1 if cut_at is not None and t >= cut_at else 0
        img, colours = np.roll(scenes[scene][0], t * pan, axis=1), scenes[scene][1]
        for s, (x0, y0, vx, vy) in enumerate(shapes):
            cx = (x0 + 0.02 * t * (vx + 0.5)) % 1.0 * w
            cy = (y0 + 0.015 * t * (vy + 0.5)) % 1.0 * h
            r = min(h, w) * (0.12 + 0.04 * s)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            img[mask] = colours[s]
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_video(path: str | Path, frames: int | np.ndarray = 48, size: tuple[int, int] = (96, 128), *,
                fps: int = 24, codec: str = "libx264", gop: int = 12, freeze_from: int | None = None,
                cut_at: int | None = None, pan: int = 0, seed: int = 0, quality: int = 12) -> np.ndarray:
    """Encode ``frames`` (a count for :func:`make_frames`, or the frames themselves ``uint8 [T, H, W, 3]``) into
    ``path`` with PyAV: ``codec`` (H.264 by default, a key frame every ``gop`` frames, ``crf=quality``; ``mpeg4``
    uses ``qscale``), yuv420p. Returns the frames written."""
    import av

    data = make_frames(frames, size, freeze_from=freeze_from, cut_at=cut_at, pan=pan, seed=seed) \
        if isinstance(frames, int) \
        else np.asarray(frames, dtype=np.uint8)
    h, w = data.shape[1:3]
    with av.open(str(path), "w") as c:
        opts = {"crf": str(quality), "preset": "veryfast", "bf": "0"} if codec == "libx264" else {"qscale": "2"}
        s = c.add_stream(codec, rate=fps, options=opts)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = gop
        for f in data:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return data
