"""vtok.video.load: explicit / uniform / fps sampling with decord and PyAV on videos written here by PyAV, seeking, and
clear errors for missing, empty, truncated and non-video files."""

import numpy as np
import pytest

import vtok.video as V
from vtok.video.decode import sample_indices
from vtok.video.synthetic import write_video

BACKENDS = ["decord", "pyav"]
CODEC_MAE = 6.0  # mean absolute pixel error H.264 (crf 12, yuv420p) leaves on these frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "shapes.mp4"
    frames = write_video(path, 48, size=(96, 128), fps=24, gop=12, cut_at=30)
    return path, frames


def _mae(a, b):
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_indices_return_exactly_those_frames(clip, backend):
    path, written = clip
    want = [5, 40, 13, 13, 0, 47, 29, 30]
    v = V.load(path, indices=want, backend=backend)
    assert v.frames.shape == (len(want), 96, 128, 3) and v.frames.dtype == np.uint8
    assert v.indices.tolist() == want and v.total == 48 and v.fps == pytest.approx(24.0) and v.backend == backend
    np.testing.assert_allclose(v.timestamps, np.array(want) / 24.0, atol=1e-3)
    for f, i in zip(v.frames, want, strict=True):
        errs = [_mae(f, w) for w in written]
        assert errs[i] < CODEC_MAE, (i, errs[i])
        assert int(np.argmin(errs)) == i, (i, errs[i], sorted(errs)[:3])  # closest written frame is the one asked


def test_backends_agree(clip):
    path, _ = clip
    a = V.load(path, num_frames=7, backend="decord")
    b = V.load(path, num_frames=7, backend="pyav")
    assert a.indices.tolist() == b.indices.tolist() == [3, 10, 17, 24, 30, 37, 44]
    assert _mae(a.frames, b.frames) < 1.0
    np.testing.assert_allclose(a.timestamps, b.timestamps, atol=1e-3)


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_fps_sampling_and_resize(clip, backend):
    path, _ = clip
    v = V.load(path, fps=4.0, size=(32, 48), backend=backend)
    assert v.indices.tolist() == [0, 6, 12, 18, 24, 30, 36, 42]  # every 0.25 s at 24 fps
    assert v.frames.shape == (8, 32, 48, 3)
    assert V.load(path, num_frames=2, size=16, backend=backend).frames.shape == (2, 16, 16, 3)


def test_all_frames_when_no_rule(clip):
    path, written = clip
    v = V.load(path, backend="pyav")
    assert v.indices.tolist() == list(range(48)) and _mae(v.frames, written) < CODEC_MAE


def test_pyav_seeks_instead_of_decoding_everything(tmp_path):
    path = tmp_path / "long.mp4"
    write_video(path, 240, size=(32, 32), gop=12)
    v = V.load(path, indices=[7, 100, 230], backend="pyav")
    assert v.decoded <= 3 * 12, v.decoded  # at most one group of pictures per wanted frame, not 240 frames
    dense = V.load(path, indices=list(range(24, 36)), backend="pyav")
    assert dense.decoded == 12  # consecutive frames of one group: one seek, no frame decoded twice


def test_sample_indices_rules():
    assert sample_indices(10, 5.0, num_frames=4).tolist() == [1, 3, 6, 8]  # bin centres
    assert sample_indices(10, 5.0, num_frames=10).tolist() == list(range(10))
    assert sample_indices(10, 5.0, fps=2.5).tolist() == [0, 2, 4, 6, 8]
    assert sample_indices(10, 5.0, fps=100.0).tolist() == list(range(10))  # duplicates removed
    with pytest.raises(ValueError, match="at most one"):
        sample_indices(10, 5.0, num_frames=2, fps=1.0)
    with pytest.raises(ValueError, match="num_frames=11: the video has only 10 frames; pass num_frames=10 or fewer"):
        sample_indices(10, 5.0, num_frames=11)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        sample_indices(10, 5.0, indices=[3, 10])
    with pytest.raises(ValueError, match="fps must be"):
        sample_indices(10, 5.0, fps=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_bad_files_raise_clear_errors(tmp_path, clip, backend):
    path, _ = clip
    data = path.read_bytes()
    cases = {
        "missing.mp4": ("no such file", None),
        "empty.mp4": ("empty", b""),
        "truncated.mp4": ("", data[: len(data) // 2]),  # moov atom at the end: gone
        "notes.txt": ("", b"not a video at all, just some text\n" * 20),
    }
    for name, (reason, content) in cases.items():
        f = tmp_path / name
        if content is not None:
            f.write_bytes(content)
        with pytest.raises(ValueError, match=f"cannot read video '.*{name}': .*{reason}"):
            V.load(f, num_frames=4, backend=backend)
        with pytest.raises(ValueError, match=f"cannot read video '.*{name}'"):
            V.load(f, indices=[0], backend=backend)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_truncated_faststart_file(tmp_path, backend):
    """moov at the front (streamable MP4) and the media data cut: the header promises more frames than exist."""
    import av

    from vtok.video.synthetic import make_frames

    full = tmp_path / "fs.mp4"
    with av.open(str(full), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for fr in make_frames(48, (48, 64)):
            for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    cut = tmp_path / "fs_cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read video '.*fs_cut.mp4'"):
        V.load(cut, indices=[47], backend=backend)


def test_argument_errors(clip):
    path, _ = clip
    with pytest.raises(ValueError, match="backend must be one of"):
        V.load(path, backend="opencv")
    with pytest.raises(ValueError, match="size must be"):
        V.load(path, num_frames=2, size=(3,))
    with pytest.raises(TypeError, match="path must be"):
        V.load(3)
