"""Finding tokenizers: a saved folder, or a name of a checkpoint committed under ``checkpoints/<name>/``."""

from __future__ import annotations

import json
from pathlib import Path

from vtok.tokenizers_img.config import ModelConfig
from vtok.tokenizers_img.tokenizer import CONFIG_FILE, FORMAT, WEIGHTS_FILE, Tokenizer
from vtok.tokenizers_img.video import VideoTokenizer

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
_CLASSES: dict[str, type[Tokenizer]] = {"image": Tokenizer, "video": VideoTokenizer}


def available_tokenizers() -> list[str]:
    """Names of the checkpoints committed under ``vtok/tokenizers_img/checkpoints/``."""
    if not CHECKPOINT_DIR.is_dir():
        return []
    return sorted(p.name for p in CHECKPOINT_DIR.iterdir()
                  if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file())


def load_folder(path: str | Path) -> Tokenizer:
    """Build the tokenizer described by ``path/config.json`` and load ``path/model.safetensors`` (on CPU)."""
    path = Path(path)
    doc = json.loads((path / CONFIG_FILE).read_text())
    if doc.get("format") != FORMAT or "model" not in doc:
        raise ValueError(f"{path / CONFIG_FILE} is not a {FORMAT} config (needs 'format': {FORMAT!r} and 'model')")
    config = ModelConfig.from_dict(doc["model"])
    tok = _CLASSES[config.kind](config, meta=doc.get("meta"))
    tok.load_weights(path)
    return tok.eval()


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """A folder written by ``Tokenizer.save`` / ``vtok train-tokenizer``, or the name of a committed checkpoint."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or Path, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return load_folder(path)
    names = available_tokenizers()
    if str(name_or_path) in names:
        return load_folder(CHECKPOINT_DIR / str(name_or_path))
    listed = ", ".join(names) if names else "none committed yet"
    raise ValueError(f"unknown tokenizer {str(name_or_path)!r}: not a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}, "
                     f"and not a committed checkpoint name (available: {listed}; train one with "
                     f"`vtok train-tokenizer --config configs/tokenizers/<name>.json`)")
