"""Training loop for the image tokenizers: seeded, resumable, atomic checkpoints, progress bar.

Every random draw of step ``s`` (crops, flips, kept lengths, binary bit samples) comes from a generator seeded
with ``(seed, s)``, so a run resumed from its last checkpoint continues exactly like an uninterrupted one.
The output folder holds ``config.json`` + ``model.safetensors`` (a loadable tokenizer), ``train_state.pt``
(weights, optimiser, step, history) and ``history.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vtok.tokenizers_img.config import RunConfig, TrainConfig
from vtok.tokenizers_img.data import CropPool, heldout_images, training_photos
from vtok.tokenizers_img.length import prefix_mask, sample_lengths
from vtok.tokenizers_img.losses import reconstruction_loss
from vtok.tokenizers_img.tokenizer import Tokenizer, atomic_write_text

STATE_FILE, HISTORY_FILE = "train_state.pt", "history.json"


@dataclass
class TrainResult:
    """Where training stopped: ``step`` done, ``history`` of logged rows, the trained ``tokenizer``."""

    step: int
    history: list[dict[str, Any]]
    tokenizer: Tokenizer
    images_per_s: float


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``min_lr_ratio · lr`` at ``steps``."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def _optimizer(model: Tokenizer, tc: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.99))


def _save(out: Path, model: Tokenizer, opt: torch.optim.Optimizer, step: int, history: list, run: RunConfig) -> None:
    model.meta = {"name": run.name, "step": step, "length_mode": run.train.length_mode, "train": run.train.to_dict()}
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "history": history,
             "config": run.to_dict()}
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / STATE_FILE)
    model.save(out)
    atomic_write_text(out / HISTORY_FILE, json.dumps(history, indent=1))


@torch.no_grad()
def evaluate(model: Tokenizer, images: torch.Tensor) -> dict[str, float]:
    """Mean held-out PSNR (dB) at k = 1, K/4 and K."""
    out = {}
    for k in sorted({1, max(1, model.num_tokens // 4), model.num_tokens}):
        rec = model.reconstruct(images.to(model.device), k).cpu()
        mse = ((rec - images) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        out[f"psnr_k{k}"] = float((10 * torch.log10(1 / mse)).mean())
    return out


def train_tokenizer(config: RunConfig | str | Path, out_dir: str | Path, *, steps: int | None = None,
                    stop_at: int | None = None, device: str | None = None, progress: bool = True,
                    log: Callable[[str], None] = print) -> TrainResult:
    """Train (or resume) the tokenizer of ``config`` into ``out_dir``.

    ``steps`` overrides ``train.steps`` (the schedule length); ``stop_at`` stops early at that step (a
    checkpoint is written) so a long run can be done in slices that resume bit-identically.
    """
    run = config if isinstance(config, RunConfig) else RunConfig.load(config)
    if steps is not None:
        run = replace(run, train=replace(run.train, steps=steps))
    tc, mc = run.train, run.model
    if mc.kind != "image":
        raise ValueError(f"train_tokenizer trains image tokenizers (model.kind='image'), got {mc.kind!r}")
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(tc.seed)
    model = Tokenizer(mc).to(dev)
    opt = _optimizer(model, tc)
    start, history = 0, []
    if (out / STATE_FILE).is_file():
        state = torch.load(out / STATE_FILE, map_location=dev, weights_only=True)
        saved = RunConfig.from_dict(state["config"])
        if saved.model != mc or replace(saved.train, steps=tc.steps) != tc:
            raise ValueError(f"{out} holds a run with a different config ({saved.name!r}); use another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), list(state["history"])
        log(f"resuming {run.name} from step {start} in {out}")
    if start >= end:
        return TrainResult(start, history, model.eval(), 0.0)

    photos = training_photos(tc.sources, tc.video_frames)
    pool = CropPool(photos, mc.image_size, tc.scales)
    eval_images = heldout_images(mc.image_size, tc.sources, limit=tc.eval_images)[0] if tc.eval_images else None
    log(f"{run.name}: {len(photos)} training images ({len(pool)} with scales), "
        f"{0 if eval_images is None else len(eval_images)} held-out eval images, device {dev}")

    model.train()
    t0, seen = time.perf_counter(), 0
    bar = _progress(progress, run.name, start, end)
    running: list[float] = []
    last: dict[str, Any] = {}
    for step in range(start, end):
        g = step_generator(tc.seed, step)
        x = pool.sample(tc.batch_size, g).to(dev)
        lengths = sample_lengths(tc.length_mode, tc.batch_size, mc.num_tokens, g, tc.nested_dist)
        keep = prefix_mask(lengths, mc.num_tokens).to(dev)
        if tc.also_full and tc.length_mode != "none":  # every image also decoded from all K tokens
            keep = torch.stack([keep, torch.ones_like(keep)])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        res = model(x, keep, generator=step_generator(tc.seed, step, dev) if dev.type != "cpu" else g)
        loss, mse = reconstruction_loss(res.recon, x.expand_as(res.recon), tc.grad_weight)
        loss = loss + tc.confidence_weight * res.penalty
        if res.flow_loss is not None:
            loss = loss + tc.flow_weight * res.flow_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        seen += tc.batch_size
        running.append(float(loss.detach()))
        done = step + 1
        if done % tc.log_every == 0 or done == end:
            row = {"step": done, "loss": sum(running) / len(running), "mse": float(mse.detach()), "lr": lr_at(step, tc),
                   "images_per_s": seen / (time.perf_counter() - t0)}
            if res.flow_loss is not None:
                row["flow"] = float(res.flow_loss.detach())
            running = []
            if done % tc.ckpt_every == 0 or done == end:
                if eval_images is not None:
                    row.update(evaluate(model, eval_images))
                    model.train()
            history.append(row)
            last = row
        bar(done, last)
        if done % tc.ckpt_every == 0 or done == end:
            _save(out, model, opt, done, history, run)
    bar(None, None)
    rate = seen / (time.perf_counter() - t0)
    log(f"{run.name}: step {end}/{tc.steps}, {rate:.1f} images/s, last {history[-1] if history else {}}")
    return TrainResult(end, history, model.eval(), rate)


def _progress(enabled: bool, name: str, start: int, end: int) -> Callable[[int | None, dict | None], None]:
    """A rich progress bar; call ``update(step, row)``, and ``update(None, None)`` to close it."""
    if not enabled:
        return lambda step, row: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"))
    prog.start()
    task = prog.add_task(name, total=end, completed=start, info="")

    def update(step: int | None, row: dict | None) -> None:
        if step is None:
            prog.stop()
            return
        if not row:
            prog.update(task, completed=step)
            return
        info = f"loss {row['loss']:.4f} {row['images_per_s']:.0f} img/s"
        info += "".join(f" {k.replace('psnr_', 'PSNR@')}={v:.2f}" for k, v in row.items() if k.startswith("psnr"))
        prog.update(task, completed=step, info=info)

    return update


__all__ = ["TrainResult", "evaluate", "lr_at", "train_tokenizer"]
