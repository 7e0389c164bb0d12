"""Write the scenes of the lmms-eval smoke tasks (``make test-lmms``): ``scenes/NN.png`` and ``scenes.jsonl``.

Held-out Fashion-MNIST scenes of ``vtok.bench.vlm_task`` (test split, seed ``HELDOUT_SEED``), cycling through the
question types whose answers are one token for the small VLM (relation: yes / no, count: 0–4, locate: 1–4), so a
multiple-choice task can be checked against greedy generation. Committed; rerun only to change them::

    python configs/lmms/make_scenes.py
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from vtok.bench import vlm_task as task

HERE = Path(__file__).resolve().parent
QTYPES = ("relation", "count", "locate")
N = 12


def main() -> None:
    (HERE / "scenes").mkdir(exist_ok=True)
    rows = []
    for i in range(N):
        scene = task.make_scene("test", task.HELDOUT_SEED, i, qtype=QTYPES[i % len(QTYPES)])
        name = f"scenes/{i:02d}.png"
        Image.fromarray(scene.image).save(HERE / name)
        rows.append({"image": name, "question": scene.question, "answer": scene.answer, "qtype": scene.qtype})
    with open(HERE / "scenes.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
