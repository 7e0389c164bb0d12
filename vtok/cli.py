"""The ``vtok`` command: ``vtok methods``, ``vtok demo``, ``vtok train-tokenizer``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="vtok: visual token compression toolkit.")
console = Console()
if not console.is_terminal:  # piped / CI logs: rich would assume 80 columns and fold every cell
    console = Console(width=180)


@app.command("methods")
def methods_cmd(family: str = typer.Option(None, help="Only this family.")) -> None:
    """List every registered strategy: family, context it needs, its position ids in a wrapped VLM, paper."""
    import vtok

    table = Table(title="vtok strategies")
    for col in ("method", "family", "needs", "uses", "merges", "vlm pos", "paper"):
        table.add_column(col, overflow="fold")
    for m in vtok.methods(family):
        table.add_row(m.name, m.family, ", ".join(sorted(m.needs)) or "-", ", ".join(sorted(m.uses)) or "-",
                      "yes" if m.merges else "", m.placement.positions, m.paper)
    console.print(table)


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("outputs/demo"), help="Output folder."),
             photo: str = typer.Option("astronaut", help="scikit-image photo name."),
             size: int = typer.Option(224, help="Image side in pixels (multiple of the patch)."),
             patch: int = typer.Option(16, help="Patch side in pixels."),
             keep: list[float] = typer.Option([0.5, 0.25, 0.1], help="Budgets to try (repeatable).")) -> None:
    """Run every model-free strategy on a real photo's patches; print a table and write a PNG."""
    from vtok.demo import run_demo

    rows = run_demo(out, photo=photo, size=size, patch=patch, keeps=tuple(keep))
    table = Table(title=f"vtok demo: {photo}, {size}px, {patch}px patches")
    for col in ("method", "family", "keep", "tokens", "PSNR (dB)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.method, r.family, f"{r.keep:g}", f"{r.kept}/{r.total}", f"{r.psnr_db:.2f}")
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


if __name__ == "__main__":
    app()
