"""Methods against explicit transcriptions of their authors' algorithms (docs/fidelity.md lists them)."""
