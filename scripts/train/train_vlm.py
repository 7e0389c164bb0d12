"""Train the small VLM (vtok.bench.vlm) on the Fashion-MNIST scene questions (vtok.bench.vlm_task). Seeded, resumable.

    make vlm                                                    # both runs below (rerun to resume)
    python -m scripts.train.train_vlm --work outputs/vlm/train  # stage 1 + stage 2 (1,000 steps, 4 questions/scene)
    python -m scripts.train.train_vlm --work outputs/vlm/train_b --init outputs/vlm/train/stage2_last.pt --offset 8000 \
        --steps2 600 --questions 6 --lr-proj 1e-3 --lr-lora 7e-4   # continued on new scenes (copy stage1.pt first)
    python -m scripts.train.train_vlm --stop-after 50           # do at most 50 more steps, then stop (state saved)

Stage 1 (no LLM, cheap): the CLIP tower learns the scenes: per visual token the class of its cell (or empty), its
cell's row and column, and from the CLS token the count of every class. Stage 2: projector + LoRA (rank 8 on the
q/k/v/o projections of all 30 SmolLM2 layers) through the frozen LLM and the frozen tower, loss on the answer tokens
(one word + ``<|im_end|>``) of one question per scene. The projector starts from the stage-1 cell classifier mapped
onto the LLM's embeddings of the class words (so the visual tokens read as words from step 0); the rest of it and
LoRA are learned. Batches are functions of the step index (scene ``offset + step·batch + i`` of a seeded stream), the
training state is saved atomically to ``--work`` every ``--save-every`` steps: stopping and rerunning the same
command continues to the same weights. To train stage 2 further with a new schedule, copy ``stage1.pt`` into a new
``--work`` and pass ``--init <old work>/stage2_last.pt``. The end product: ``--out`` (fp16 tower + projector + LoRA,
with held-out accuracy in its metadata) and ``--work/eval.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vtok.bench import vlm
from vtok.bench import vlm_task as task

STAGE1_KEYS = ("seed", "steps1", "batch1", "lr1", "warmup", "vision")  # what the stage-1 result depends on
RUN_ONLY = ("work", "out", "save_every", "stop_after", "eval_every", "eval_n", "log_every")


@dataclasses.dataclass
class Config:
    """Hyper-parameters (everything here but ``RUN_ONLY`` must match on resume)."""

    seed: int = 0
    steps1: int = 1200
    batch1: int = 64
    lr1: float = 1e-3
    steps2: int = 1000
    batch2: int = 8
    questions: int = 4  # questions per scene in stage 2, asked as one multi-turn conversation (image read once)
    lr_proj: float = 2e-3
    lr_lora: float = 1e-3
    lora_r: int = 8
    warmup: int = 50
    vision: dict | None = None
    init: str | None = None  # stage 2 starts from this run's projector + LoRA (a stage2_last.pt or --out file)
    offset: int | None = None  # stage 2 reads scenes from this index of the stream on (a continuation sees new ones)
    work: str = "outputs/vlm/train"
    out: str = str(vlm.CHECKPOINT)
    save_every: int = 50
    stop_after: int | None = None
    eval_every: int = 200
    eval_n: int = 2000
    log_every: int = 10


class Log:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_resume(saved: dict, cfg: Config | dict, what: str) -> None:
    """Raise ``ValueError`` when the saved configuration differs from ``cfg`` outside ``RUN_ONLY``."""
    now = {k: v for k, v in (cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)).items() if k not in RUN_ONLY}
    old = {k: v for k, v in saved.items() if k not in RUN_ONLY}
    diff = {k: (old.get(k), now.get(k)) for k in set(old) | set(now) if old.get(k) != now.get(k)}  # missing = None
    if diff:
        raise ValueError(f"{what}: configuration differs from the saved run (saved, now): {diff}; "
                         "use another --work or the same arguments")


# ------------------------------------------------------------------ stage 1: the vision tower
class Stage1(nn.Module):
    """CLIP tower + heads: cell class (7 + empty), row, column per patch token; class counts (0–4) from CLS."""

    def __init__(self, vision: dict | None = None):
        super().__init__()
        from transformers import AutoModel, CLIPVisionConfig

        self.tower = AutoModel.from_config(CLIPVisionConfig(**{**vlm.VISION_CONFIG, **(vision or {})}))
        d = self.tower.config.hidden_size
        self.cell = nn.Linear(d, task.N_CLASSES + 1)
        self.row = nn.Linear(d, task.CELLS)
        self.col = nn.Linear(d, task.CELLS)
        self.count = nn.Linear(d, task.N_CLASSES * 5)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + N, d]``: the hidden states LLaVA reads (``vision_feature_layer=-1``)."""
        return self.tower(pixels, output_hidden_states=True).hidden_states[-1]

    def loss(self, pixels: torch.Tensor, cells: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, float]:
        h = self.features(pixels)
        tok = h[:, 1:]
        n = tok.shape[1]
        side = math.isqrt(n)
        per = side // task.CELLS
        rows = (torch.arange(side).repeat_interleave(side) // per).expand(len(h), n)
        cols = (torch.arange(side).repeat(side) // per).expand(len(h), n)
        lc = self.cell(tok)
        loss = (F.cross_entropy(lc.flatten(0, 1), cells.flatten())
                + 0.5 * F.cross_entropy(self.row(tok).flatten(0, 1), rows.flatten())
                + 0.5 * F.cross_entropy(self.col(tok).flatten(0, 1), cols.flatten())
                + F.cross_entropy(self.count(h[:, 0]).view(-1, 5), counts.flatten()))
        acc = float((lc.argmax(-1) == cells).float().mean())
        return loss, acc


def stage1_batch(seed: int, step: int, batch: int, split: str = "train") -> tuple[torch.Tensor, ...]:
    scenes = [task.make_scene(split, seed, step * batch + i) for i in range(batch)]
    pixels = task.pixel_values([s.image for s in scenes])
    cells = torch.from_numpy(np.stack([task.cell_targets(s.cells) for s in scenes]))
    counts = torch.from_numpy(np.stack([task.count_targets(s.cells) for s in scenes]))
    return pixels, cells, counts


@torch.no_grad()
def stage1_eval(model: Stage1, n: int = 512) -> dict[str, float]:
    """Token accuracy of the cell head and exact count accuracy on held-out scenes."""
    model.eval()
    pixels, cells, counts = stage1_batch(task.HELDOUT_SEED, 0, n, split="test")
    h = model.features(pixels)
    acc = float((model.cell(h[:, 1:]).argmax(-1) == cells).float().mean())
    cacc = float((model.count(h[:, 0]).view(n, -1, 5).argmax(-1) == counts).float().mean())
    model.train()
    return {"cell_token_acc": acc, "count_acc": cacc}


def train_stage1(cfg: Config, log: Log) -> tuple[Stage1, int]:
    """The trained stage-1 model and the number of steps this call did."""
    work = Path(cfg.work)
    final = work / "stage1.pt"
    torch.manual_seed(cfg.seed)
    model = Stage1(cfg.vision)
    if final.exists():
        st = torch.load(final, weights_only=False)
        check_resume({k: st["cfg"].get(k) for k in STAGE1_KEYS}, {k: getattr(cfg, k) for k in STAGE1_KEYS},
                     "stage 1")
        model.load_state_dict(st["model"])
        return model.eval(), 0
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr1, weight_decay=0.05)
    last, step = work / "stage1_last.pt", 0
    if last.exists():
        st = torch.load(last, weights_only=False)
        check_resume({k: st["cfg"].get(k) for k in STAGE1_KEYS}, {k: getattr(cfg, k) for k in STAGE1_KEYS},
                     "stage 1")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        log(f"stage 1: resumed at step {step}")
    model.train()
    done, t0 = 0, time.perf_counter()
    while step < cfg.steps1:
        if cfg.stop_after is not None and done >= cfg.stop_after:
            atomic_save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                         "cfg": dataclasses.asdict(cfg)}, last)
            log(f"stage 1: stopped after {done} steps at step {step} (--stop-after)")
            raise SystemExit(0)
        for g in opt.param_groups:
            g["lr"] = cfg.lr1 * lr_factor(step, cfg.steps1, cfg.warmup)
        loss, acc = model.loss(*stage1_batch(cfg.seed, step, cfg.batch1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        done += 1
        if step % cfg.log_every == 0 or step == cfg.steps1:
            log(f"stage 1 step {step}/{cfg.steps1} loss {loss.item():.4f} cell_acc {acc:.3f} "
                f"{(time.perf_counter() - t0) / done:.2f} s/step")
        if step % cfg.save_every == 0 or step == cfg.steps1:
            atomic_save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                         "cfg": dataclasses.asdict(cfg)}, last)
    log(f"stage 1 done: held-out {stage1_eval(model)}")
    atomic_save({"model": model.state_dict(), "cfg": dataclasses.asdict(cfg)}, final)
    return model.eval(), done


# ------------------------------------------------------------------ stage 2: projector + LoRA through the LLM
def seed_projector(model, weight: torch.Tensor, bias: torch.Tensor, cell_logits: torch.Tensor, tokenizer,
                   seed: int) -> None:
    """Projector start from token heads ``weight [k, d]`` / ``bias [k]`` whose first 8 rows are class logits (7
    classes + empty) and the rest row / column logits: hidden units ``0 … k−1`` = those logits, units 0–7 mapped by
    ``linear_2`` onto the LLM's embeddings of the class words (" nothing" for empty), scaled to one embedding at a
    typical logit (the mean GELU of the top class logit in ``cell_logits [.., 8]``); the other units random at 1/10
    of the default scale."""
    proj = model.model.multi_modal_projector
    g = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for lin in (proj.linear_1, proj.linear_2):
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.uniform_(-bound, bound, generator=g).mul_(0.1)
            lin.bias.zero_()
        k = len(weight)
        proj.linear_1.weight[:k] = weight
        proj.linear_1.bias[:k] = bias
        typical = float(F.gelu(cell_logits.max(-1).values).mean().clamp_min(1.0))
        ids = [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in (*task.WORDS, task.NOTHING)]
        proj.linear_2.weight[:, :len(ids)] = emb[ids].t() / typical
        proj.linear_2.weight[:, len(ids):k] = 0.0


def init_projector(model, stage1: Stage1, tokenizer, seed: int) -> None:
    """:func:`seed_projector` from the stage-1 cell / row / column heads (the typical logit read on 16 scenes)."""
    with torch.no_grad():
        heads = torch.cat([stage1.cell.weight, stage1.row.weight, stage1.col.weight])
        bias = torch.cat([stage1.cell.bias, stage1.row.bias, stage1.col.bias])
        logits = stage1.cell(stage1.features(stage1_batch(seed + 1, 0, 16)[0])[:, 1:])
    seed_projector(model, heads, bias, logits, tokenizer, seed)


def scene_questions(scene: task.Scene, seed: int, index: int, n: int) -> list[tuple[str, str]]:
    """The scene's own question and ``n − 1`` more about the same scene (a pure function of ``seed, index``)."""
    rng = np.random.default_rng([int(seed), int(index), 1])
    return [(scene.question, scene.answer)] + [task.ask(scene.cells, rng)[:2] for _ in range(n - 1)]


def stage2_texts(tokenizer, convs: list[list[tuple[str, str]]], n_image: int) -> tuple[torch.Tensor, ...]:
    """``(input_ids, attention_mask, targets)`` right-padded ``[B, T]`` of one conversation per image (the image
    in the first user turn, then question / answer turns); targets −100 except the answer tokens and each closing
    ``<|im_end|>`` (predicted from the position before each)."""
    rows, tgts = [], []
    for conv in convs:
        ids: list[int] = []
        tgt: list[int] = []
        for j, (question, ans) in enumerate(conv):
            msgs = vlm.prompt(question) if j == 0 else [{"role": "user", "content": question}]
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            text = text.replace(vlm.IMAGE_TOKEN, vlm.IMAGE_TOKEN * n_image)
            p = tokenizer(text, add_special_tokens=j == 0)["input_ids"]
            a = tokenizer.encode(ans + "<|im_end|>", add_special_tokens=False)
            nl = tokenizer.encode("\n", add_special_tokens=False) if j < len(conv) - 1 else []
            ids += p + a + nl
            tgt += [-100] * (len(p) - 1) + a + [-100] * (1 + len(nl))
        rows.append(ids)
        tgts.append(tgt)
    t = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (t - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    targets = torch.tensor([r + [-100] * (t - len(r)) for r in tgts])
    return ids, mask, targets


def stage2_loss(model, tokenizer, scenes: list[task.Scene], convs: list[list[tuple[str, str]]] | None = None):
    """Mean cross-entropy of the answer tokens; ``convs`` (default: each scene's own question) per scene."""
    n_image = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    convs = convs if convs is not None else [[(s.question, s.answer)] for s in scenes]
    ids, mask, targets = stage2_texts(tokenizer, convs, n_image)
    pixels = task.pixel_values([s.image for s in scenes])
    h = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).last_hidden_state
    sel = targets != -100
    logits = model.lm_head(h[sel])
    return F.cross_entropy(logits, targets[sel])


def trainable(model) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters()
            if k.startswith("model.multi_modal_projector.") or ".lora_" in k}


def evaluate(model, processor, scenes: list[task.Scene], batch: int = 16, ask=None) -> dict:
    """Exact-match accuracy (overall and per question type) of greedy answers through the chat template
    (``ask(model, processor, images, questions)``, default :func:`vtok.bench.vlm.answer`)."""
    ask = ask or vlm.answer
    model.eval()
    hits: dict[str, list[int]] = {}
    allh, preds = [], []
    for s in range(0, len(scenes), batch):
        chunk = scenes[s:s + batch]
        out = ask(model, processor, [c.image for c in chunk], [c.question for c in chunk])
        for c, p in zip(chunk, out, strict=True):
            hit = int(task.exact_match(p, c.answer))
            hits.setdefault(c.qtype, []).append(hit)
            allh.append(hit)
            preds.append(task.normalize_answer(p))
    return {"accuracy": sum(allh) / len(allh), "n": len(allh), "accuracy_first200": float(np.mean(allh[:200])),
            "per_type": {k: sum(v) / len(v) for k, v in sorted(hits.items())}, "answers_first50": preds[:50]}


def copy_init(params: dict[str, nn.Parameter], init: str) -> None:
    """Copy a previous run's projector + LoRA (``--init``: a ``stage2_last.pt`` or a saved ``.safetensors``) into
    ``params``; ``ValueError`` when its keys differ, except for whole LoRA adapters only this run has (new targets,
    whose ``B = 0`` leaves the old run's model unchanged)."""
    if init.endswith(".safetensors"):
        state = {k: v for k, v in vlm.read_trained(init)[0].items() if k in params}
    else:
        state = torch.load(init, weights_only=False)["trainable"]
    new = set(params) - set(state)  # adapters this run adds (B = 0: the model starts as the old run's)
    if set(state) - set(params) or any(".lora_" not in k for k in new) \
            or any(k.replace(".lora_A", ".lora_B") not in new for k in new if k.endswith(".lora_A")):
        raise ValueError(f"--init {init}: its projector / LoRA keys do not match this model")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def build_stage2(cfg: Config, stage1: Stage1, llm, tokenizer):
    torch.manual_seed(cfg.seed)
    model = vlm.build_vlm(llm, tokenizer, vision=cfg.vision, seed=cfg.seed)
    model.model.vision_tower.load_state_dict(stage1.tower.state_dict())
    init_projector(model, stage1, tokenizer, cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    vlm.add_lora(model, r=cfg.lora_r, alpha=2.0 * cfg.lora_r, seed=cfg.seed)
    params = trainable(model)
    if cfg.init:
        copy_init(params, cfg.init)
    for p in params.values():
        p.requires_grad_(True)
    return model


def train_stage2(cfg: Config, stage1: Stage1, llm, tokenizer, log: Log, budget: int | None = None):
    """``(model, finished)``: at most ``budget`` steps (None: to the end), resuming from ``--work``."""
    work = Path(cfg.work)
    model = build_stage2(cfg, stage1, llm, tokenizer)
    params = trainable(model)
    proj = [p for k, p in params.items() if "lora_" not in k]
    lora = [p for k, p in params.items() if "lora_" in k]
    opt = torch.optim.AdamW([{"params": proj, "lr": cfg.lr_proj, "base": cfg.lr_proj},
                             {"params": lora, "lr": cfg.lr_lora, "base": cfg.lr_lora}], weight_decay=0.0)
    last, step = work / "stage2_last.pt", 0
    if last.exists():
        st = torch.load(last, weights_only=False)
        check_resume(st["cfg"], cfg, "stage 2")
        with torch.no_grad():
            for k, v in st["trainable"].items():
                params[k].copy_(v)
        opt.load_state_dict(st["opt"])
        step = st["step"]
        log(f"stage 2: resumed at step {step}")
    def save() -> None:
        atomic_save({"step": step, "trainable": {k: p.detach().clone() for k, p in params.items()},
                     "opt": opt.state_dict(), "cfg": dataclasses.asdict(cfg)}, last)

    processor = vlm.build_processor(tokenizer)
    seed2 = cfg.seed + 1000
    done, t0, run_loss = 0, time.perf_counter(), []
    model.train()
    while step < cfg.steps2:
        if budget is not None and done >= budget:
            save()
            log(f"stage 2: stopped after {done} steps at step {step} (--stop-after)")
            return model, False
        f = lr_factor(step, cfg.steps2, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = g["base"] * f
        index = [(cfg.offset or 0) + step * cfg.batch2 + i for i in range(cfg.batch2)]
        scenes = [task.make_scene("train", seed2, i) for i in index]
        convs = [scene_questions(s, seed2, i, cfg.questions) for s, i in zip(scenes, index, strict=True)]
        loss = stage2_loss(model, tokenizer, scenes, convs)
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
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps2:
            r = evaluate(model, processor, task.heldout(200))
            model.train()
            log(f"stage 2 step {step}: held-out[:200] {json.dumps(r)}")
    return model, True


def main(argv: list[str] | None = None, llm=None, tokenizer=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        if f.name == "vision":
            ap.add_argument("--vision", type=json.loads, default=None, help="JSON overrides of the tower config")
            continue
        typ = int if f.type in ("int", "int | None") else float if f.type == "float" else str  # str | None too
        ap.add_argument("--" + f.name.replace("_", "-"), type=typ, default=f.default)
    cfg = Config(**vars(ap.parse_args(argv)))
    torch.use_deterministic_algorithms(True, warn_only=True)
    work = Path(cfg.work)
    log = Log(work / "log.txt")
    log(f"config {json.dumps(dataclasses.asdict(cfg))} threads {torch.get_num_threads()}")
    stage1, done1 = train_stage1(cfg, log)
    for p in stage1.parameters():
        p.requires_grad_(False)
    tokenizer = tokenizer if tokenizer is not None else vlm.load_tokenizer()
    llm = llm if llm is not None else vlm.load_llm()
    budget = None if cfg.stop_after is None else cfg.stop_after - done1
    model, finished = train_stage2(cfg, stage1, llm, tokenizer, log, budget)
    if not finished:
        raise SystemExit(0)
    result_path = work / "eval.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    t0 = time.perf_counter()
    scenes = task.heldout(cfg.eval_n)
    res = evaluate(model, vlm.build_processor(tokenizer), scenes)
    res["chance"] = task.chance_levels(scenes)
    res["eval_s"] = time.perf_counter() - t0
    res["config"] = dataclasses.asdict(cfg)
    log(f"held-out ({cfg.eval_n} scenes): {json.dumps(res)}")
    keys = ("accuracy", "n", "accuracy_first200", "per_type", "chance", "answers_first50")
    vlm.save_trained(model, cfg.out, meta={k: res[k] for k in keys})
    result_path.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
