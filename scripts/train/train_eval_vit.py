"""Train the evaluation ViT (vtok.bench.eval_vit) on Fashion-MNIST. Deterministic under --seed, resumable.

    make eval-vit                                 # the committed checkpoint: 3 stages of this script
    python -m scripts.train.train_eval_vit        # stage 1 alone (2-core CPU: ~45 min)
    python -m scripts.train.train_eval_vit --limit 512 --epochs 1 --out /tmp/vit.safetensors   # smoke run

Recipe: AdamW (lr 1e-3, batch 128, wd 0.05), linear warmup then cosine decay, label smoothing 0.1, augmentation =
random translation (±2 original pixels) and horizontal flip. Progressive resizing (FixRes, Touvron et al. 2019;
FlexiViT-style position-embedding resampling): the first ``--low-res-epochs`` train on the native 28×28 images
(7×7 = 49 tokens, ~5× cheaper per image), the rest at the model's 56×56 (196 tokens), so the model ends adapted to
the resolution it is evaluated at. The loss classifies both the mean-pooled patch tokens (the model's output) and
the CLS token through the same head. The training state is saved
atomically to ``--work/last.pt`` every ``--save-every`` steps and at each epoch end; rerunning the same command
resumes from it. The final weights go to ``--out`` (safetensors) with test accuracy in the metadata.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vtok.bench.eval_vit import CHECKPOINT, build_eval_vit, load_eval_vit, save_eval_vit
from vtok.bench.fashion_mnist import load_fashion_mnist, preprocess

RUN_ONLY = ("out", "work", "save_every", "device", "stop_after")  # arguments that may change on resume


def augment(x: torch.Tensor, g: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Random translation by up to ``shift`` px (background padding) and horizontal flip. ``x``: ``[n, 1, h, w]``."""
    n, _, h, w = x.shape
    pad = F.pad(x, (shift,) * 4, value=float(x.min()))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, 1, h, w + 2 * shift)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, 1, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(x), batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[s:s + batch].to(device))
        correct += int((logits.argmax(-1).cpu() == y[s:s + batch]).sum())
    model.train()
    return correct / len(x)


def dual_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the mean-pooled head (the model's output) plus that of the CLS token through the same
    head, so the CLS token — whose attention CLS-attention strategies read — carries class information."""
    feats = model.forward_features(x)
    cls_logits = model.head(model.fc_norm(feats[:, 0]))
    return (F.cross_entropy(model.forward_head(feats), y, label_smoothing=0.1)
            + F.cross_entropy(cls_logits, y, label_smoothing=0.1)) / 2


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=2.3)
    ap.add_argument("--low-res-epochs", type=float, default=2.0, help="epochs at 28×28 (49 tokens) before 56×56")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N training images (smoke runs)")
    ap.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images only")
    ap.add_argument("--out", type=Path, default=CHECKPOINT, help="fp16 safetensors output")
    ap.add_argument("--work", type=Path, default=Path("outputs/train_eval_vit"))
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--stop-after", type=int, default=0, help="stop (state saved) after this many steps")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from these weights (a --work/last.pt or a safetensors checkpoint), fresh optimiser and "
                         "schedule: a warm restart, e.g. a second stage")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    if args.limit:
        xtr, ytr = xtr[: args.limit], ytr[: args.limit]
    if args.test_limit:
        xte, yte = xte[: args.test_limit], yte[: args.test_limit]
    xlow, xtr, xte_low, xte = preprocess(xtr, 28), preprocess(xtr), preprocess(xte[:1000], 28), preprocess(xte)
    model = build_eval_vit(dynamic_img_size=True).to(device)  # same weights; resamples pos-embed at 28×28
    if args.init is not None:
        if args.init.suffix == ".safetensors":
            init = load_eval_vit(args.init).state_dict()
        else:
            init = torch.load(args.init, map_location="cpu", weights_only=False)["model"]
        model.load_state_dict(init)
        print(f"initialised from {args.init}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(xtr) / args.batch)
    total = math.ceil(steps_per_epoch * args.epochs)
    low_steps = min(total, math.ceil(steps_per_epoch * args.low_res_epochs))
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))
    step = 0
    args.work.mkdir(parents=True, exist_ok=True)
    state_path = args.work / "last.pt"
    # must match to resume
    run_key = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in RUN_ONLY}
    if state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=False)
        if st["args"] != run_key:
            raise ValueError(f"{state_path} was written with different arguments; remove it or use another --work")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        print(f"resumed from {state_path} at step {step}/{total}", flush=True)

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "args": run_key}, tmp)
        os.replace(tmp, state_path)

    if args.stop_after and step >= args.stop_after:
        print(f"already at step {step} (--stop-after {args.stop_after}); nothing to do", flush=True)
        return {"stopped_at": step}
    model.train()
    t0, seen = time.time(), 0
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for i in range(pos, steps_per_epoch):
            if step >= total:
                break
            if step == low_steps and low_steps:
                acc28 = evaluate(model, xte_low, yte[:1000], device)
                acc56 = evaluate(model, xte[:1000], yte[:1000], device)
                print(f"switching to 56×56 at step {step}: test accuracy (first 1000) at 28×28 {acc28:.4f}, "
                      f"at 56×56 {acc56:.4f}", flush=True)
            idx = order[i * args.batch:(i + 1) * args.batch]
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # this step's augmentation
            low = step < low_steps
            xb = augment((xlow if low else xtr)[idx], g, shift=2 if low else 4).to(device)
            yb = ytr[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, args.lr)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = dual_loss(model, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            seen += len(idx)
            if step % 50 == 0 or step == total:
                rate = seen / (time.time() - t0)
                print(f"step {step}/{total} epoch {epoch} {'28' if low else '56'}px loss {loss.item():.4f} "
                      f"lr {group['lr']:.2e} {rate:.0f} img/s", flush=True)
            if step % args.save_every == 0:
                save_state()
            if args.stop_after and step >= args.stop_after:
                save_state()
                print(f"stopped after step {step}; rerun to resume", flush=True)
                return {"stopped_at": step}
        save_state()
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})  # as stored (fp16)
    acc = evaluate(model, xte, yte, device)
    meta = {"test_accuracy": acc, "test_images": len(xte), "train_images": len(xtr), "epochs": args.epochs,
            "seed": args.seed, "command": "python -m scripts.train.train_eval_vit " + " ".join(argv or sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_eval_vit(model.cpu(), args.out, meta)
    print(f"test accuracy {acc:.4f}; wrote {args.out}", flush=True)
    return meta


if __name__ == "__main__":
    main()
