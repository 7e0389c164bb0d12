"""Train the small VLM on the real CLIP ViT-B/16 tower (vtok.bench.vlm_clip) on vtok.bench.clip_scenes. Resumable.

    python -m scripts.train.train_vlm_clip --work outputs/vlm_clip/train        # all phases (rerun to resume)
    python -m scripts.train.train_vlm_clip --work outputs/vlm_clip/train --stop-after 50   # 50 more steps, then stop

LLaVA-1.5's recipe with the tower frozen, so its features are computed once:

1. **Features.** The frozen tower's penultimate hidden states ``[197, 768]`` of ``--train-n`` train scenes and
   ``--cache-eval-n`` held-out scenes, cached in shards of 250 under ``--work/features`` (fp16; train shards computed
   under bf16 autocast, 2× faster here, cosine 0.9996 to fp32; held-out shards in fp32). A finished shard is never
   recomputed.
2. **Stage 1** (no LLM, seconds): linear heads on the cached patch features, per token its class (7 + background),
   row and column (``clip_scenes.token_targets``). They seed the projector as in ``scripts/train/train_vlm.py``:
   hidden units 0–15 are these logits, mapped by the second layer onto the LLM's embeddings of the class words.
3. **Stage 2**: projector + LoRA (rank 8, q/k/v/o of all 30 layers; ``--lora-targets attn+mlp`` adds the MLPs)
   through the frozen LLM on the cached features, ``--batch2`` scenes per step, ``--questions`` questions per scene
   in one multi-turn conversation, under bf16 autocast; loss on the answer tokens. Scene ``i`` of step ``s`` is
   ``first_scene + (s·batch + i) mod train_n`` (``--first-scene`` lets a continued run see scenes the earlier run
   never saw), its questions are drawn afresh each pass over the scenes (a pure function of seed, scene, pass). State
   saved every ``--save-every`` steps (atomically); every ``--eval-every`` steps, teacher-forced accuracy on 200
   cached held-out scenes (all answer tokens argmax-correct). To train further on a new schedule, copy ``stage1.pt``
   and ``features/`` into a new ``--work`` and pass ``--init <old work>/stage2_last.pt``.
4. **Evaluation**: the LLaVA folder is assembled (real tower, LoRA merged), loaded with ``from_pretrained`` and asked
   ``--eval-n`` held-out questions with greedy ``generate`` in fp32; the result goes to ``--work/eval.json`` and into
   the ``--out`` checkpoint's metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scripts.train.train_vlm import (
    Log,
    atomic_save,
    check_resume,
    copy_init,
    evaluate,
    lr_factor,
    seed_projector,
    stage2_texts,
    trainable,
)
from vtok.bench import clip_scenes as cs
from vtok.bench import vlm, vlm_clip
from vtok.bench import vlm_task as task

SHARD = 250
LORA_TARGETS = {"attn": vlm.LORA_TARGETS, "attn+mlp": vlm.LORA_TARGETS + vlm.MLP_TARGETS}
STAGE1_KEYS = ("seed", "first_scene", "train_n", "steps1", "lr1")


@dataclasses.dataclass
class Config:
    """Hyper-parameters (everything but ``RUN_ONLY`` must match on resume)."""

    seed: int = 0
    train_n: int = 6000
    first_scene: int = 0  # train on scenes first_scene … first_scene + train_n − 1 (a multiple of SHARD)
    cache_eval_n: int = 1000
    steps1: int = 2000
    lr1: float = 2e-3
    steps2: int = 1200
    batch2: int = 8
    questions: int = 6
    lr_proj: float = 2e-3
    lr_lora: float = 1e-3
    lora_r: int = 8
    lora_targets: str = "attn"  # "attn": q/k/v/o of every layer; "attn+mlp": and gate/up/down
    warmup: int = 50
    init: str | None = None  # stage 2 starts from this run's projector + LoRA (a stage2_last.pt or --out file)
    work: str = "outputs/vlm_clip/train"
    out: str = str(vlm_clip.CHECKPOINT)
    save_every: int = 25
    stop_after: int | None = None
    eval_every: int = 100
    eval_n: int = 1000
    log_every: int = 10


DEFAULTS = {"first_scene": 0, "lora_targets": "attn"}  # what runs saved before these options were added used
RUN_ONLY = ("work", "out", "save_every", "stop_after", "eval_every", "eval_n", "log_every", "cache_eval_n")


# ------------------------------------------------------------------ 1. features of the frozen tower
def shards(n: int, first: int = 0) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of the feature files of the ``n`` scenes from ``first``."""
    return [(s, min(first + n, s + SHARD)) for s in range(first, first + n, SHARD)]


def shard_path(work: Path, split: str, start: int, end: int) -> Path:
    return work / "features" / f"{split}_{start:06d}_{end:06d}.safetensors"


@torch.no_grad()
def cache_features(work: Path, split: str, n: int, log: Log, tower=None, bf16: bool = False, first: int = 0) -> None:
    """Write the tower's layer −2 hidden states of scenes ``first … first+n−1`` of the split's stream, ``SHARD``
    per file (``feats`` fp16 ``[s, 197, 768]``, ``cells`` ``[s, 4, 4]``, ``targets`` ``[s, 3, 196]`` from
    ``clip_scenes.token_targets``, the scenes' questions in the metadata)."""
    from safetensors.torch import save_file

    seed = cs.TRAIN_SEED if split == "train" else cs.HELDOUT_SEED
    todo = [r for r in shards(n, first) if not shard_path(work, split, *r).exists()]
    if not todo:
        return
    if tower is None:
        from vtok.bench.towers import load_tower

        tower = load_tower(vlm_clip.TOWER, library="hf", projection=False)
    for start, end in todo:
        t0 = time.perf_counter()
        ids = range(start, end)
        feats, cells, targets, qa = [], [], [], []
        for b in range(0, len(ids), 25):
            chunk = [cs.make_scene(split, seed, i) for i in ids[b:b + 25]]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                h = tower(cs.pixel_values([c.image for c in chunk]), output_hidden_states=True).hidden_states
            feats.append(h[vlm_clip.FEATURE_LAYER].float().half())
            cells += [torch.from_numpy(c.cells) for c in chunk]
            targets += [torch.from_numpy(np.stack(cs.token_targets(c))) for c in chunk]
            qa += [[c.question, c.answer, c.qtype] for c in chunk]
        path = shard_path(work, split, start, end)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"feats": torch.cat(feats).contiguous(), "cells": torch.stack(cells),
                   "targets": torch.stack(targets)}, str(tmp),
                  metadata={"qa": json.dumps(qa), "bf16": str(bf16)})
        tmp.replace(path)
        log(f"features {split} {start}-{end - 1}: {time.perf_counter() - t0:.1f} s")


def read_features(work: Path, split: str, n: int, targets: bool = False, first: int = 0) -> tuple:
    """``(feats fp16 [n, 197, 768], cells [n, 4, 4], [(question, answer, qtype)])`` of the ``n`` cached scenes of
    ``split`` from ``first`` (cached in ranges of ``SHARD``), plus ``targets [n, 3, 196]`` if asked."""
    from safetensors import safe_open

    feats, cells, tg, qa = [], [], [], []
    have = sorted((work / "features").glob(f"{split}_*.safetensors"))
    ranges = sorted(tuple(int(v) for v in p.stem.split("_")[1:]) for p in have)
    for start in range(first, first + n, SHARD):
        end = next((e for s, e in ranges if s == start and e >= min(first + n, start + SHARD)), None)
        if end is None:
            raise FileNotFoundError(f"{work / 'features'}: no cached {split} features for scenes {start}+")
        with safe_open(str(shard_path(work, split, start, end)), "pt") as f:
            feats.append(f.get_tensor("feats"))
            cells.append(f.get_tensor("cells"))
            if targets:
                tg.append(f.get_tensor("targets"))
            qa += json.loads(f.metadata()["qa"])
    out = (torch.cat(feats)[:n], torch.cat(cells)[:n], qa[:n])
    return out + (torch.cat(tg)[:n],) if targets else out


# ------------------------------------------------------------------ 2. stage 1: token heads on the features
class Heads(nn.Module):
    """Per patch token: class (7 + background), row, column logits from the frozen features ``[.., 768]``."""

    def __init__(self, d: int):
        super().__init__()
        self.cell = nn.Linear(d, task.N_CLASSES + 1)
        self.row = nn.Linear(d, cs.CELLS)
        self.col = nn.Linear(d, cs.CELLS)


def train_stage1(cfg: Config, work: Path, log: Log) -> Heads:
    final = work / "stage1.pt"
    heads = Heads(768)
    if final.exists():
        st = torch.load(final, weights_only=False)
        check_resume({k: st["cfg"].get(k, getattr(Config, k)) for k in STAGE1_KEYS},  # older runs: defaults
                     {k: getattr(cfg, k) for k in STAGE1_KEYS},
                     "stage 1")
        heads.load_state_dict(st["model"])
        return heads
    n_fit = min(cfg.train_n, 2000)
    feats, _, _, targets = read_features(work, "train", n_fit, targets=True, first=cfg.first_scene)
    x = feats[:, 1:].reshape(-1, feats.shape[-1])
    y = targets.permute(0, 2, 1).reshape(-1, 3)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    heads = Heads(x.shape[-1])
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr1, weight_decay=0.01)
    t0 = time.perf_counter()
    for step in range(cfg.steps1):
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr1 * lr_factor(step, cfg.steps1, cfg.warmup)
        idx = torch.randint(len(x), (4096,), generator=g)
        xb, yb = x[idx].float(), y[idx]
        loss = (F.cross_entropy(heads.cell(xb), yb[:, 0]) + 0.5 * F.cross_entropy(heads.row(xb), yb[:, 1])
                + 0.5 * F.cross_entropy(heads.col(xb), yb[:, 2]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0:
            log(f"stage 1 step {step + 1}/{cfg.steps1} loss {loss.item():.4f}")
    with torch.no_grad():
        hf, _, _, ht = read_features(work, "test", min(cfg.cache_eval_n, 500), targets=True)
        xt = hf[:, 1:].float()
        acc = {name: float((getattr(heads, name)(xt).argmax(-1) == ht[:, j]).float().mean())
               for j, name in enumerate(("cell", "row", "col"))}
        fg = ht[:, 0] < task.N_CLASSES
        acc["cell_on_items"] = float((heads.cell(xt).argmax(-1) == ht[:, 0])[fg].float().mean())
    log(f"stage 1 done in {time.perf_counter() - t0:.0f} s: held-out token accuracy {json.dumps(acc)}")
    atomic_save({"model": heads.state_dict(), "cfg": dataclasses.asdict(cfg), "acc": acc}, final)
    return heads


def init_projector(model, heads: Heads, feats: torch.Tensor, tokenizer, seed: int) -> None:
    """``train_vlm.seed_projector`` from the stage-1 heads: hidden units 0–7 = the class logits mapped onto the
    LLM's embeddings of the class words, 8–15 = row / column logits, the rest random at 1/10 scale."""
    with torch.no_grad():
        w = torch.cat([heads.cell.weight, heads.row.weight, heads.col.weight])
        b = torch.cat([heads.cell.bias, heads.row.bias, heads.col.bias])
        logits = heads.cell(feats[:16, 1:].float())
    seed_projector(model, w, b, logits, tokenizer, seed)


# ------------------------------------------------------------------ 3. stage 2: projector + LoRA through the LLM
def conversations(cells: torch.Tensor, qa: list, seed: int, index: int, n: int, first: bool) -> list[tuple[str, str]]:
    """``n`` questions about scene ``index`` (its own question first when ``first``), a pure function of the
    arguments."""
    rng = np.random.default_rng([int(seed), int(index), 2])
    c = cells.numpy()
    own = [(qa[0], qa[1])] if first else []
    return own + [task.ask(c, rng)[:2] for _ in range(n - len(own))]


def features_loss(model, tokenizer, feats: torch.Tensor,
                  convs: list[list[tuple[str, str]]]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(loss, (logits [S, V], targets [S], sel [B, T]))``: mean cross-entropy of the ``S`` answer tokens (their
    positions ``sel``), the image tokens being ``projector(feats[:, 1:])`` (LLaVA's ``default`` select strategy:
    [CLS] dropped) placed as ``LlavaModel`` places them."""
    ids, mask, targets = stage2_texts(tokenizer, convs, feats.shape[1] - 1)
    emb = model.get_input_embeddings()(ids)
    img = model.model.multi_modal_projector(feats[:, 1:].float())
    where = (ids == model.config.image_token_id)[..., None].expand_as(emb)
    emb = emb.masked_scatter(where, img.to(emb.dtype))
    h = model.model.language_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    sel = targets != -100
    logits = model.lm_head(h[sel])
    return F.cross_entropy(logits.float(), targets[sel]), (logits, targets[sel], sel)


@torch.no_grad()
def teacher_forced(model, tokenizer, feats: torch.Tensor, qa: list, batch: int = 20) -> dict:
    """Share of held-out questions whose answer tokens (and ``<|im_end|>``) are all the argmax, per type."""
    model.eval()
    hits: dict[str, list[int]] = {}
    for s in range(0, len(qa), batch):
        convs = [[(q, a)] for q, a, _ in qa[s:s + batch]]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, (logits, targets, sel) = features_loss(model, tokenizer, feats[s:s + batch], convs)
        wrong = torch.zeros_like(sel)
        wrong[sel] = logits.argmax(-1) != targets  # the answer tokens only: logits were computed for them alone
        ok = ~wrong.any(1)
        for j, (_, _, qt) in enumerate(qa[s:s + batch]):
            hits.setdefault(qt, []).append(int(ok[j]))
    model.train()
    allh = [h for v in hits.values() for h in v]
    return {"accuracy": sum(allh) / len(allh), "per_type": {k: sum(v) / len(v) for k, v in sorted(hits.items())}}


def build_stage2(cfg: Config, heads: Heads, feats: torch.Tensor, llm, tokenizer):
    torch.manual_seed(cfg.seed)
    model = vlm_clip.build_clip_vlm(llm, tokenizer, seed=cfg.seed, pretrained_tower=False)
    init_projector(model, heads, feats, tokenizer, cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    vlm.add_lora(model, r=cfg.lora_r, alpha=2.0 * cfg.lora_r, seed=cfg.seed, targets=LORA_TARGETS[cfg.lora_targets])
    params = trainable(model)
    if cfg.init:
        copy_init(params, cfg.init)
    for p in params.values():
        p.requires_grad_(True)
    return model


def train_stage2(cfg: Config, work: Path, heads: Heads, llm, tokenizer, log: Log, budget: int | None):
    feats, cells, qa = read_features(work, "train", cfg.train_n, first=cfg.first_scene)
    hfeats, _, hqa = read_features(work, "test", min(200, cfg.cache_eval_n))
    model = build_stage2(cfg, heads, feats, llm, tokenizer)
    params = trainable(model)
    proj = [p for k, p in params.items() if "lora_" not in k]
    lora = [p for k, p in params.items() if "lora_" in k]
    opt = torch.optim.AdamW([{"params": proj, "lr": cfg.lr_proj, "base": cfg.lr_proj},
                             {"params": lora, "lr": cfg.lr_lora, "base": cfg.lr_lora}], weight_decay=0.0)
    last, step = work / "stage2_last.pt", 0
    if last.exists():
        st = torch.load(last, weights_only=False)
        now = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}
        check_resume({**DEFAULTS, **st["cfg"]}, now, "stage 2")  # options newer than the run: their defaults
        with torch.no_grad():
            for k, v in st["trainable"].items():
                params[k].copy_(v)
        opt.load_state_dict(st["opt"])
        step = st["step"]
        log(f"stage 2: resumed at step {step}")

    def save() -> None:
        atomic_save({"step": step, "trainable": {k: p.detach().clone() for k, p in params.items()},
                     "opt": opt.state_dict(),
                     "cfg": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}}, last)

    done, t0, run_loss = 0, time.perf_counter(), []
    model.train()
    while step < cfg.steps2:
        if budget is not None and done >= budget:
            save()
            log(f"stage 2: stopped after {done} steps at step {step} (--stop-after)")
            return model, False
        f = lr_factor(step, cfg.steps2, cfg.warmup)
        for grp in opt.param_groups:
            grp["lr"] = grp["base"] * f
        flat = [step * cfg.batch2 + i for i in range(cfg.batch2)]
        index = [j % cfg.train_n for j in flat]
        convs = [conversations(cells[i], qa[i], cfg.seed + 1000 * (j // cfg.train_n), cfg.first_scene + i,
                               cfg.questions,
                               first=j < cfg.train_n) for i, j in zip(index, flat, strict=True)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = features_loss(model, tokenizer, feats[index], convs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        step += 1
        done += 1
        run_loss.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps2:
            log(f"stage 2 step {step}/{cfg.steps2} loss {np.mean(run_loss):.4f} "
                f"{(time.perf_counter() - t0) / done:.2f} s/step")
            run_loss = []
        if step % cfg.save_every == 0 or step == cfg.steps2:
            save()
        if cfg.eval_every and step % cfg.eval_every == 0:
            r = teacher_forced(model, tokenizer, hfeats, hqa)
            log(f"stage 2 step {step}: held-out[:200] teacher-forced {json.dumps(r)}")
    return model, True


def main(argv: list[str] | None = None, llm=None, tokenizer=None, tower=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        typ = int if f.type in ("int", "int | None") else float if f.type == "float" else str
        ap.add_argument("--" + f.name.replace("_", "-"), type=typ, default=f.default)
    cfg = Config(**vars(ap.parse_args(argv)))
    if cfg.train_n < 1 or cfg.cache_eval_n < 1 or cfg.batch2 < 1 or cfg.questions < 1:
        raise SystemExit("--train-n, --cache-eval-n, --batch2 and --questions must be >= 1")
    if cfg.lora_targets not in LORA_TARGETS:
        raise SystemExit(f"--lora-targets must be one of {sorted(LORA_TARGETS)}, got {cfg.lora_targets!r}")
    if cfg.first_scene < 0 or cfg.first_scene % SHARD:
        raise SystemExit(f"--first-scene must be a multiple of {SHARD} and >= 0, got {cfg.first_scene}")
    work = Path(cfg.work)
    log = Log(work / "log.txt")
    log(f"config {json.dumps(dataclasses.asdict(cfg))} threads {torch.get_num_threads()}")
    cache_features(work, "test", cfg.cache_eval_n, log, tower)
    cache_features(work, "train", cfg.train_n, log, tower, bf16=True, first=cfg.first_scene)
    heads = train_stage1(cfg, work, log)
    for p in heads.parameters():
        p.requires_grad_(False)
    tokenizer = tokenizer if tokenizer is not None else vlm.load_tokenizer()
    llm = llm if llm is not None else vlm.load_llm()
    model, finished = train_stage2(cfg, work, heads, llm, tokenizer, log, cfg.stop_after)
    if not finished:
        raise SystemExit(0)
    result_path = work / "eval.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    trained = work / "trained.safetensors"
    vlm.save_trained(model, trained, meta={"step": cfg.steps2}, tower=False)
    folder = work / "assembled"
    vlm_clip.assemble(folder, trained, llm=llm, tokenizer=tokenizer)
    full, processor = vlm_clip.load_clip_vlm(folder, weights=trained)
    t0 = time.perf_counter()
    scenes = cs.heldout(cfg.eval_n)
    res = evaluate(full, processor, scenes, ask=vlm_clip.answer)
    res["chance"] = task.chance_levels(scenes)
    res["eval_s"] = time.perf_counter() - t0
    res["config"] = dataclasses.asdict(cfg)
    log(f"held-out ({cfg.eval_n} scenes): {json.dumps(res)}")
    keys = ("accuracy", "n", "accuracy_first200", "per_type", "chance", "answers_first50")
    vlm.save_trained(model, cfg.out, meta={k: res[k] for k in keys}, tower=False)
    result_path.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
