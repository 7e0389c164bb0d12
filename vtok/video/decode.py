"""Decode sampled frames of a video file with decord or PyAV, seeking instead of decoding everything.

``vtok.video.load(path, num_frames=32)`` returns a :class:`Video`: frames ``uint8 [T, H, W, 3]`` (RGB), their indices
in the file and their timestamps. Only the requested frames are kept in memory: decord seeks to each batch of frames
itself; the PyAV backend first reads the packet index (no decoding) to learn every frame's presentation time and the
key frames, then seeks to the key frame before each wanted frame and decodes forward only from there (consecutive
wanted frames in one group of pictures share one seek).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtok.video.errors import ArgumentError, literal

BACKENDS = ("auto", "decord", "pyav")


@dataclass(frozen=True)
class Video:
    """Sampled frames of one video file.

    Attributes:
        frames: ``uint8 [T, H, W, 3]`` RGB frames, in the order requested.
        indices: ``int64 [T]`` each frame's index in the file (presentation order, from 0).
        timestamps: ``float64 [T]`` each frame's presentation time in seconds, from the first frame.
        fps: the stream's average frame rate.
        total: number of frames in the file.
        backend: ``"decord"`` or ``"pyav"``.
        path: the file.
        decoded: frames the decoder produced to get these (PyAV: counts every decoded frame, showing that it seeks
            rather than decoding the whole file); ``-1`` where the backend does not say (decord).
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    fps: float
    total: int
    backend: str
    path: Path
    decoded: int = -1

    @property
    def duration(self) -> float:
        """Length of the video in seconds (``total / fps``)."""
        return self.total / self.fps if self.fps > 0 else 0.0


def _fail(path: Path, reason: str) -> ValueError:
    return ValueError(f"cannot read video {str(path)!r}: {reason}")


def check_path(path: str | Path) -> Path:
    """``path`` as a :class:`Path` if it is a non-empty, non-text file; else ``ValueError`` naming it and why."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path to a video file, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise _fail(p, "no such file")
    if not p.is_file():
        raise _fail(p, "not a regular file")
    if p.stat().st_size == 0:
        raise _fail(p, "the file is empty (0 bytes)")
    with p.open("rb") as f:
        head = f.read(4096)
    if _looks_like_text(head):  # FFmpeg's tty demuxer would "play" a text file as ANSI art
        raise _fail(p, "it is a text file, not a video")
    return p


_CONTROL = bytes(set(range(32)) - {9, 10, 12, 13, 27})


def _looks_like_text(head: bytes) -> bool:
    """All printable text (no NUL / control bytes) and not an HLS playlist: every video container has binary headers
    (MP4 box sizes, Matroska's EBML id, RIFF sizes, MPEG-TS packets)."""
    return bool(head) and not head.startswith(b"#EXTM3U") and not any(c in _CONTROL for c in head)


def check_sampling(num_frames: object, fps: object, indices: object) -> None:
    """At most one sampling rule, each of the right type (bounds against the video come later)."""
    given = [name for name, v in (("num_frames", num_frames), ("fps", fps), ("indices", indices)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of num_frames, fps, indices; got {given}")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral)
                                   or num_frames < 1):
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps)
                            or fps <= 0):
        raise ValueError(f"fps must be a number > 0, got {fps!r}")


def sample_indices(total: int, video_fps: float, *, num_frames: int | None = None, fps: float | None = None,
                   indices: Sequence[int] | np.ndarray | None = None, source: str = "the video") -> np.ndarray:
    """Frame indices ``int64 [T]`` to decode from a video of ``total`` frames at ``video_fps``.

    At most one of: ``num_frames`` (uniform: the centres of ``num_frames`` equal bins,
    ``floor((2j + 1)·total / (2·num_frames))``; more than ``total`` raises :class:`ArgumentError` naming
    ``source`` and its frame count), ``fps`` (one frame every ``1 / fps`` seconds from 0: frame
    ``floor(t · video_fps)``, duplicates removed), ``indices`` (exactly those, in that order). None: every frame.
    """
    check_sampling(num_frames, fps, indices)
    if indices is not None:
        arr = np.asarray(indices)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"indices must be a non-empty 1-D sequence of ints, got {indices!r}")
        if arr.min() < 0 or arr.max() >= total:
            raise ValueError(f"indices must lie in [0, {total}) for a video of {total} frames, got min {arr.min()}, "
                             f"max {arr.max()}")
        return arr.astype(np.int64)
    if num_frames is not None:
        if num_frames > total:
            raise ArgumentError("num_frames", num_frames, f"{literal(source)} has only {total} frames; pass "
                                f"{{num_frames}}{total} or fewer")
        j = np.arange(int(num_frames), dtype=np.int64)
        return ((2 * j + 1) * total) // (2 * int(num_frames))
    if fps is not None:
        if video_fps <= 0:
            raise ValueError("fps sampling needs the video's frame rate, which the file does not give")
        times = np.arange(0.0, total / video_fps, 1.0 / float(fps))
        return np.unique(np.minimum(np.floor(times * video_fps + 1e-6).astype(np.int64), total - 1))
    return np.arange(total, dtype=np.int64)


def _resize(frames: np.ndarray, size: int | tuple[int, int] | None) -> np.ndarray:
    """``[T, H, W, 3]`` → ``[T, h, w, 3]`` (bilinear, PIL); ``size`` an int (square) or ``(h, w)``."""
    if size is None:
        return frames
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        h = w = int(size)
    elif (isinstance(size, (tuple, list)) and len(size) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size)):
        h, w = int(size[0]), int(size[1])
    else:
        raise ValueError(f"size must be an int (square side) or a pair (h, w), got {size!r}")
    if h < 1 or w < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    from PIL import Image

    out = np.empty((len(frames), h, w, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR))
    return out


# ------------------------------------------------------------------------------------------------------ decord


def _load_decord(path: Path, sampling: dict, size) -> Video:
    try:
        import decord
    except ImportError as e:  # pragma: no cover - decord is a core dependency
        raise _fail(path, f"decord is not installed ({e})") from e
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        total = len(vr)
        vfps = float(vr.get_avg_fps())
    except Exception as e:  # decord raises its own DECORDError (a RuntimeError) for anything it cannot open
        raise _fail(path, f"decord cannot open it ({_first_line(e)})") from e
    if total < 1:
        raise _fail(path, "it has no video frames")
    try:
        idx = sample_indices(total, vfps, **sampling, source=f"the video {str(path)!r}")
    except ValueError:
        try:  # a file decord "opens" but cannot decode (e.g. FFmpeg's tty demuxer on a text file) is not a video
            vr[0]
        except Exception as e:
            raise _fail(path, f"decord cannot decode it ({_first_line(e)}); not a video, or corrupt?") from e
        raise
    try:
        frames = vr.get_batch(idx.tolist()).asnumpy()
        ts = np.asarray(vr.get_frame_timestamp(idx.tolist()), dtype=np.float64).reshape(-1, 2)[:, 0]
        t0 = float(np.asarray(vr.get_frame_timestamp([0])).reshape(-1)[0])
    except Exception as e:
        raise _fail(path, f"decord cannot decode the requested frames ({_first_line(e)}); truncated or corrupt?") from e
    del vr
    return Video(_resize(frames, size), idx, ts - t0, vfps, total, "decord", path)


# -------------------------------------------------------------------------------------------------------- PyAV


def _scan(container, stream) -> tuple[np.ndarray, np.ndarray]:
    """Presentation timestamps of every frame (sorted) and of the key frames, from the packets alone."""
    pts, keys = [], []
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    return np.sort(np.asarray(pts, dtype=np.int64)), np.sort(np.asarray(keys, dtype=np.int64))


def _load_pyav(path: Path, sampling: dict, size) -> Video:
    try:
        import av
    except ImportError as e:
        raise _fail(path, f"PyAV is not installed ({e}); pip install av") from e
    try:
        container = av.open(str(path))
    except Exception as e:
        raise _fail(path, f"PyAV cannot open it ({_first_line(e)})") from e
    try:
        if not container.streams.video:
            raise _fail(path, "it has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context.name in ("ansi", "bintext", "xbin", "idf"):
            raise _fail(path, f"not a video (FFmpeg reads it as {stream.codec_context.name} text art)")
        stream.thread_type = "AUTO"
        try:
            pts, keys = _scan(container, stream)
        except av.error.FFmpegError as e:
            raise _fail(path, f"PyAV cannot read its packets ({_first_line(e)}); truncated or corrupt?") from e
        total = len(pts)
        if total < 1:
            raise _fail(path, "it has no video frames")
        if stream.frames and stream.frames > total:
            raise _fail(path, f"truncated: its header declares {stream.frames} frames, only {total} can be read")
        rate = stream.average_rate or stream.guessed_rate
        vfps = float(rate) if rate else 0.0
        idx = sample_indices(total, vfps, **sampling, source=f"the video {str(path)!r}")
        frames, decoded = _decode_pyav(path, container, stream, pts, keys, idx)
        tb = float(stream.time_base)
        ts = (pts[idx] - pts[0]).astype(np.float64) * tb
    finally:
        container.close()
    return Video(_resize(frames, size), idx, ts, vfps, total, "pyav", path, decoded)


def _decode_pyav(path: Path, container, stream, pts: np.ndarray, keys: np.ndarray,
                 idx: np.ndarray) -> tuple[np.ndarray, int]:
    """Decode the frames at presentation times ``pts[idx]``: one seek per wanted frame unless it lies in the group of
    pictures already being decoded (no key frame between the last decoded frame and it)."""
    import av

    wanted = np.unique(idx)
    got: dict[int, np.ndarray] = {}
    it, cur, decoded = None, None, 0
    try:
        for i in wanted.tolist():
            target = int(pts[i])
            if it is None or cur is None or cur >= target or bool(((keys > cur) & (keys <= target)).any()):
                container.seek(target, backward=True, any_frame=False, stream=stream)
                it, cur = container.decode(stream), None
            for frame in it:
                decoded += 1
                if frame.pts is None:
                    continue
                cur = int(frame.pts)
                if cur >= target:
                    got[i] = frame.to_ndarray(format="rgb24")
                    break
            if i not in got:
                raise _fail(path, f"frame {i} (of {len(pts)}) could not be decoded; truncated or corrupt?")
    except av.error.FFmpegError as e:
        raise _fail(path, f"PyAV cannot decode it ({_first_line(e)}); truncated or corrupt?") from e
    return np.stack([got[i] for i in idx.tolist()]), decoded


def _first_line(e: BaseException) -> str:
    """The first line of an error, without decord's ``[time] file.cc:123:`` log prefix."""
    text = str(e).strip().splitlines()
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text[0])[:200] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------- API


def load(path: str | Path, num_frames: int | None = None, fps: float | None = None,
         indices: Sequence[int] | np.ndarray | None = None, size: int | tuple[int, int] | None = None,
         backend: str = "auto") -> Video:
    """Decode frames of the video at ``path``.

    Args:
        path: a video file (anything FFmpeg reads: MP4, MKV, WebM, AVI, …).
        num_frames: sample this many frames uniformly (bin centres; see :func:`sample_indices`).
        fps: sample one frame every ``1 / fps`` seconds.
        indices: decode exactly these frame indices (presentation order), returned in this order.
        size: resize every frame to ``size × size`` (an int) or ``(h, w)``, bilinear.
        backend: ``"decord"``, ``"pyav"``, or ``"auto"`` (decord, then PyAV if decord cannot read the file).

    Returns:
        :class:`Video` with ``frames uint8 [T, H, W, 3]``, ``indices``, ``timestamps`` (seconds).

    Raises:
        ValueError: a missing, empty, corrupt, truncated or non-video file (the message names the file and the
            reason), or bad sampling arguments.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    p = check_path(path)
    sampling = {"num_frames": num_frames, "fps": fps, "indices": indices}
    check_sampling(num_frames, fps, indices)  # argument errors before touching the file
    if size is not None:
        _resize(np.zeros((0, 1, 1, 3), np.uint8), size)
    if backend == "pyav":
        return _load_pyav(p, sampling, size)
    if backend == "decord":
        return _load_decord(p, sampling, size)
    try:
        return _load_decord(p, sampling, size)
    except ValueError as first:
        if not str(first).startswith("cannot read video"):
            raise  # a sampling error: the same with any backend
        try:
            return _load_pyav(p, sampling, size)
        except ValueError as second:
            raise _fail(p, f"{str(first).split(': ', 1)[-1]}; {str(second).split(': ', 1)[-1]}") from second


def probe(path: str | Path, backend: str = "pyav") -> tuple[int, float, tuple[int, int]]:
    """``(total frames, fps, (height, width))`` of a video without decoding its pixels (PyAV reads the packets)."""
    p = check_path(path)
    if backend == "decord":
        v = _load_decord(p, {"indices": [0]}, None)
        return v.total, v.fps, v.frames.shape[1:3]
    import av

    try:
        with av.open(str(p)) as c:
            if not c.streams.video:
                raise _fail(p, "it has no video stream")
            s = c.streams.video[0]
            pts, _ = _scan(c, s)
            rate = s.average_rate or s.guessed_rate
            return len(pts), float(rate) if rate else 0.0, (s.codec_context.height, s.codec_context.width)
    except av.error.FFmpegError as e:
        raise _fail(p, f"PyAV cannot read it ({_first_line(e)})") from e
