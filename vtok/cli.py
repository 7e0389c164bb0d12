"""The ``vtok`` command: ``vtok methods``, ``vtok demo``, ``vtok train-tokenizer``, ``vtok sweep``, ``vtok report``."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="vtok: visual token compression toolkit.")
console = Console()
if not console.is_terminal:  # piped / CI logs: rich would assume 80 columns and fold every cell
    console = Console(width=180)


def _refuse(message: str) -> NoReturn:
    """Print ``message`` as one ``error:`` line (never folded, no markup read from it) and exit with status 2."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, emoji=False, highlight=False)
    raise typer.Exit(2)


@app.command("methods")
def methods_cmd(family: str = typer.Option(None, help="Only this family (baseline, attention, transition, "
                                           "diversity, clustering, temporal).")) -> None:
    """List every registered strategy: family, source file, context it needs, its position ids in a wrapped VLM,
    paper."""
    import vtok
    from vtok.pruners.registry import FAMILIES

    if family is not None and family not in FAMILIES:
        _refuse(f"--family {family}: no such family; choose one of {', '.join(FAMILIES)}")
    table = Table(title="vtok strategies")
    for col in ("method", "family", "source", "needs", "uses", "merges", "vlm pos", "paper"):
        table.add_column(col, overflow="fold", no_wrap=col == "source")
    for m in vtok.methods(family):
        table.add_row(m.name, m.family, m.source or "-", ", ".join(sorted(m.needs)) or "-",
                      ", ".join(sorted(m.uses)) or "-", "yes" if m.merges else "", m.placement.positions, m.paper)
    console.print(table)


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("outputs/demo"), help="Output folder."),
             photo: str = typer.Option("astronaut", help="scikit-image photo name."),
             size: int = typer.Option(224, help="Image side in pixels (multiple of the patch)."),
             patch: int = typer.Option(16, help="Patch side in pixels."),
             keep: list[str] = typer.Option(["0.5", "0.25", "0.1"], help="Budgets to try (repeatable): an int is a "
                                            "token count (1 = one token), a float a ratio (1.0 = every token).")
             ) -> None:
    """Run every model-free strategy on a real photo's patches; print a table and write a PNG."""
    from vtok.budget import parse_keep
    from vtok.demo import run_demo

    try:
        keeps = tuple(parse_keep(k, name="--keep") for k in keep)
    except ValueError as e:
        _refuse(str(e))
    rows = run_demo(out, photo=photo, size=size, patch=patch, keeps=keeps)
    table = Table(title=f"vtok demo: {photo}, {size}px, {patch}px patches")
    for col in ("method", "family", "keep", "tokens", "PSNR (dB)", "note"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.method, r.family, f"{r.keep:g}", f"{r.kept}/{r.total}" if r.kept else "-",
                      f"{r.psnr_db:.2f}" if r.kept else "-", r.note)
    console.print(table)
    console.print(f"wrote {out / 'kept_patches.png'}")
    _tokenizer_demo(out)


def _tokenizer_demo(out: Path) -> None:
    """Reconstruction grids (k = 1, 2, 4, …, K) for every committed tokenizer checkpoint."""
    from vtok.tokenizers_img.demo import demo_committed

    written = demo_committed(out)
    if not written:
        console.print("tokenizers: no committed checkpoint under vtok/tokenizers_img/checkpoints/ yet; skipped")
    for path in written:
        console.print(f"wrote {path}")


VIDEO_FLAGS = {"method": "--method", "keep": "--keep", "frames": "--frames", "num_frames": "--frames",
               "spec": "--encoder", "checkpoint": "--checkpoint", "text": "--text", "backend": "--backend",
               "picture": "--out"}
"""``vtok compress-video``'s flag for each argument of the video pipeline (its errors name the flag)."""


def _random_weights_note(spec: str) -> str:
    return (f"note: {spec} has random weights (no --checkpoint): the token counts and times are real, but which "
            f"patches the picture shows as kept carries no meaning. For a real tower pass --checkpoint FILE (that "
            f"encoder's state_dict, .safetensors or .pt); vtok does not bundle a pretrained tower yet.")


@app.command("compress-video")
def compress_video_cmd(
        video: Path = typer.Argument(..., help="A video file (MP4, MKV, WebM, AVI, ...)."),
        method: str = typer.Option(..., "--method", help="A strategy from `vtok methods` (temporal, or an image "
                                   "strategy run inside every frame)."),
        keep: str = typer.Option(..., "--keep", help="Tokens to keep, as vtok.compress reads it: a whole number is a "
                                 "count (--keep 1: one token, --keep 784: 784), a number with a point a ratio in "
                                 "(0, 1] (--keep 1.0: every token, --keep 0.25: a quarter)."),
        frames: int = typer.Option(32, "--frames", help="Frames sampled uniformly (at most the clip's frames)."),
        encoder: str = typer.Option("timm:vit_tiny_patch16_224", "--encoder", help="timm:NAME or open_clip:NAME "
                                    "(random weights unless --checkpoint)."),
        checkpoint: Path = typer.Option(None, "--checkpoint", help="The encoder's weights (its state_dict in a "
                                        ".safetensors or .pt file); without it the tokens carry no meaning."),
        text: str = typer.Option(None, "--text", help="open_clip only: score frames against this text "
                                 "(the frame scores query_budget reads)."),
        backend: str = typer.Option("auto", "--backend", help="auto, decord or pyav."),
        out: Path = typer.Option(Path("outputs/compress_video.png"), "--out", help="The picture to write (.png, "
                                 ".jpg, ...).")) -> None:
    """Decode a video, encode its frames with a ViT, compress the tokens; print counts and times, write a picture.
    Every argument is checked before decoding starts."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from vtok.budget import parse_keep, resolve_k
    from vtok.video.errors import ArgumentError
    from vtok.video.pipeline import FrameEncoder, check_checkpoint, check_request, check_spec, compress_video

    try:
        budget = parse_keep(keep, name="--keep")
        check_spec(encoder)
        if checkpoint is not None:
            check_checkpoint(checkpoint)
        check_request(method, frames=frames, path=video, backend=backend, text=text, picture=out)
        with Progress(TextColumn("{task.description:<9}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as bar:
            tasks: dict[str, int] = {}

            def report(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            report("load ViT", 0, 1)
            enc = FrameEncoder.load(encoder, checkpoint)
            report("load ViT", 1, 1)
            check_request(method, frames=frames, encoder=enc, backend=backend, text=text)
            resolve_k(budget, frames * enc.grid[0] * enc.grid[1], name="--keep")
            if enc.random_weights:
                console.print(_random_weights_note(enc.spec), soft_wrap=True, markup=False, highlight=False)
            res = compress_video(video, method, budget, encoder=enc, frames=frames, backend=backend, text=text,
                                 picture=out, progress=report)
    except ArgumentError as e:
        _refuse(e.for_cli(VIDEO_FLAGS))
    except (ValueError, TypeError) as e:
        _refuse(str(e))
    v = res.video
    console.print(f"{video}: {v.total} frames at {v.fps:.2f} fps ({v.backend}); sampled {len(v.frames)} at "
                  f"{enc.image_size}px -> {res.grid[0]}x{res.grid[1]} patches per frame ({enc.spec})")
    console.print(f"tokens: {res.before} -> {res.after} ({res.method}, keep={budget}; "
                  f"{res.after / res.before:.1%} kept)")
    table = Table(title="time per stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, s in res.seconds.items():
        table.add_row(stage, f"{s:.3f}")
    console.print(table)
    console.print(f"wrote {res.picture}")


@app.command("train-tokenizer")
def train_tokenizer_cmd(config: Path = typer.Option(..., exists=True, dir_okay=False, help="configs/tokenizers/*.json"),
                        out: Path = typer.Option(None, help="Output folder (default outputs/tokenizers/<name>)."),
                        steps: int = typer.Option(None, help="Override the schedule length train.steps."),
                        stop_at: int = typer.Option(None, help="Stop (and checkpoint) at this step; rerun resumes."),
                        device: str = typer.Option(None, help="cpu / cuda (default: cuda if available).")) -> None:
    """Train a 1D image tokenizer; resumes from the last checkpoint in the output folder."""
    from vtok.tokenizers_img.config import RunConfig
    from vtok.tokenizers_img.train import train_tokenizer

    run = RunConfig.load(config)
    out = out or Path("outputs/tokenizers") / run.name
    res = train_tokenizer(run, out, steps=steps, stop_at=stop_at, device=device, log=console.print)
    console.print(f"done: step {res.step}; load with vtok.load_tokenizer({str(out)!r})")


def _sweep_tables(rows: list[dict], title: str) -> list[Table]:
    """Rich tables of sweep rows, one per task: the columns that vary within the task (those equal in every row go
    into the title, empty ones are left out), so the summary fits a terminal; ``n/a`` and why for failed cells.
    The report's markdown / CSV keep every column."""
    from vtok.sweep.report import markdown

    lines = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in markdown(rows).splitlines()]
    head, body = lines[0], lines[2:]
    tables = []
    for task in dict.fromkeys(r[0] for r in body):
        group = [r for r in body if r[0] == task]
        cols, const = [], []
        for j, name in enumerate(head):
            values = {r[j] for r in group}
            if len(values) == 1 and values != {""} and name not in ("method", "keep") and len(group) > 1:
                const.append(f"{name} {values.pop()}")  # the same in every row: said once, in the title
            elif any(values - {"", "n/a"}):
                cols.append(j)
        table = Table(title=f"{title} — " + ", ".join(const))
        for j in cols:
            table.add_column(head[j], overflow="fold")
        for r in group:
            table.add_row(*[r[j] for j in cols])
        tables.append(table)
    return tables


def _parse_task_options(items: list[str] | None) -> dict[str, dict] | None:
    """``["eval_vit.limit=200", ...]`` -> ``{"eval_vit": {"limit": 200}}`` (values read as YAML scalars), each
    checked against the task's declared options (name, type, range); errors name ``--task-option TASK.OPTION``."""
    if not items:
        return None
    import yaml

    from vtok.sweep.tasks import get_task

    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        task, dot, opt = key.partition(".")
        if not (sep and dot and task and opt):
            raise ValueError(f"--task-option: expected TASK.OPTION=VALUE, got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        try:
            spec = get_task(task)
        except ValueError as e:
            raise ValueError(f"--task-option {key}: {str(e).removeprefix('tasks: ')}") from None
        spec.check_options({opt: parsed}, prefix=f"--task-option {task}")
        out.setdefault(task, {})[opt] = parsed
    return out


@app.command("sweep")
def sweep_cmd(config: Path = typer.Argument(None, dir_okay=False, help="A sweep YAML (configs/sweeps/*.yaml)."),
              methods: str = typer.Option(None, help="Comma-separated methods (overrides the config)."),
              keep: str = typer.Option(None, help="Comma-separated budgets: ratios in (0, 1] or int counts."),
              task: str = typer.Option(None, help="Comma-separated tasks: eval_vit, timing, hf_vlm, hf_vlm_timing."),
              model: str = typer.Option(None, help="Comma-separated models (eval_vit, a checkpoint, an HF folder)."),
              placement: str = typer.Option(None, help="Comma-separated placements (inside, after, pre_llm, llm:K)."),
              seed: str = typer.Option(None, help="Comma-separated seeds."),
              task_option: list[str] = typer.Option(None, help="TASK.OPTION=VALUE, e.g. eval_vit.limit=500 "
                                                    "(repeatable)."),
              shard_size: int = typer.Option(None, help="Cells per shard (they share one model load)."),
              results: Path = typer.Option(None, help="Results JSONL (default outputs/sweeps/<name>.jsonl)."),
              backend: str = typer.Option("local", help="local, or ray (pip install 'vtok[ray]')."),
              address: str = typer.Option(None, help="Ray cluster address (--backend ray); default a local one."),
              report: bool = typer.Option(True, help="Write the CSV / markdown / PNG report at the end."),
              progress: bool = typer.Option(True, help="Show the progress bars.")) -> None:
    """Run a method x keep x placement x model x task grid; re-running the same command resumes it."""
    from vtok.sweep import load_config, run_sweep, write_report

    try:
        cfg = load_config(config, methods=methods, keeps=keep, tasks=task, models=model, placements=placement,
                          seeds=seed, task_options=_parse_task_options(task_option), shard_size=shard_size)
        path = results or Path("outputs/sweeps") / f"{cfg.name}.jsonl"
        summary = run_sweep(cfg, str(path), backend=backend, address=address, show_progress=progress,
                            console=console)
    except (ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for table in _sweep_tables(summary.rows, f"{cfg.name}: {path}"):
        console.print(table)
    console.print(f"{summary.total} cells: {summary.skipped} already in {path}, {summary.ran} run now "
                  f"({summary.seconds:.1f} s), {len(summary.errors)} n/a, {len(summary.failed)} failed")
    for err in summary.errors:
        console.print(f"  n/a: {err}", markup=False, highlight=False)
    for reason, n in summary.failure_reasons().items():
        console.print(f"  failed ({n} cell{'s' * (n > 1)}): {reason}", markup=False, highlight=False)
    if report and any("failed" not in r for r in summary.rows):
        res = write_report(path)
        console.print("wrote " + ", ".join(str(f) for f in res["files"]))
    if summary.failed:
        console.print(f"[red]error:[/red] {len(summary.failed)} cell(s) failed (written as failed to "
                      f"{escape(str(path))}); re-run the same command to redo them", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command("report")
def report_cmd(results: Path = typer.Argument(..., exists=True, dir_okay=False, help="A sweep's results JSONL."),
               out: Path = typer.Option(None, help="Output folder (default: results path minus .jsonl).")) -> None:
    """Write a CSV, a markdown table and PNG plots (metric / speed vs kept tokens, accuracy-speed frontier)."""
    from vtok.sweep import write_report

    try:
        res = write_report(results, out)
    except ValueError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(res["markdown"], markup=False, highlight=False, soft_wrap=True)
    if res["failed"]:
        console.print(f"{res['failed']} failed cell(s) left out (re-run the sweep to redo them)")
    console.print("wrote " + ", ".join(str(f) for f in res["files"]))


if __name__ == "__main__":
    app()
