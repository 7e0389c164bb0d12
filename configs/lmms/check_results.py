"""Check what lmms-eval wrote for the smoke tasks (``make test-lmms``); lmms-eval exits 0 even when a task fails.

    python configs/lmms/check_results.py OUT_DIR --limit N

``OUT_DIR`` is lmms-eval's ``--output_path`` of one run with ``--log_samples``. Checked: one results file holding
both tasks, each evaluated on ``N`` docs (the first ``N`` of ``scenes.jsonl``); every multiple-choice response is a
``(loss > 0, greedy)`` pair; per doc at most one option is greedy, and when one is, it has the lowest loss and it is
what greedy generation answered (the options are one token each, so generation's first token and the option scoring
read the same position); at least half the docs have a greedy option; each doc's ``acc`` is that of the lowest-loss
option. Exits 1 with one
line naming the failed check, else prints the metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils import doc_to_choice  # the tasks' own options, beside this file (run as a file: its folder is sys.path[0])

HERE = Path(__file__).resolve().parent

GEN, MC = "vtok_scenes_gen", "vtok_scenes_mc"


class CheckError(Exception):
    pass


def _one(out: Path, pattern: str) -> Path:
    found = sorted(out.rglob(pattern))
    if len(found) != 1:
        raise CheckError(f"{out}: expected one file {pattern}, found {len(found)} (did the run fail?)")
    return found[0]


def _samples(out: Path, task: str) -> dict[int, dict]:
    path = _one(out, f"*_samples_{task}.jsonl")
    return {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}


def _pair(resp) -> tuple[float, bool]:
    """A logged multiple-choice response: ``[loss, greedy]``, which lmms-eval's sample log writes as strings."""
    if not (isinstance(resp, list) and len(resp) == 2 and str(resp[1]) in ("True", "False")):
        raise CheckError(f"{MC}: a response is {resp!r}, expected a [loss, greedy] pair")
    loss = float(resp[0])
    if not loss > 0:
        raise CheckError(f"{MC}: loss {loss} is not > 0 (a log-probability instead of a loss?)")
    return loss, str(resp[1]) == "True"


def _text(resp) -> str:
    while isinstance(resp, list) and len(resp) == 1:
        resp = resp[0]
    if not isinstance(resp, str):
        raise CheckError(f"{GEN}: a response is {resp!r}, expected a string")
    return resp.strip().lower().strip(".!?,")


def check_doc(mc: dict, doc: dict, generated: str) -> bool:
    """Check one multiple-choice sample ``mc`` of ``doc`` (a row of scenes.jsonl) against the generated answer;
    whether it has a greedy option."""
    choices, n = doc_to_choice(doc), mc["doc_id"]
    pairs = [_pair(r) for r in mc["filtered_resps"]]
    losses = [loss for loss, _ in pairs]
    best = min(range(len(pairs)), key=losses.__getitem__)
    greedy = [i for i, (_, g) in enumerate(pairs) if g]
    if len(pairs) != len(choices) or mc["target"] != doc["answer"]:
        raise CheckError(f"{MC} doc {n}: {len(pairs)} responses, target {mc['target']!r}; expected {len(choices)}, "
                         f"{doc['answer']!r} (scenes.jsonl changed?)")
    if len(greedy) > 1:
        raise CheckError(f"{MC} doc {n}: {len(greedy)} options are all greedy (the same token scored for each?)")
    if greedy and greedy[0] != best:
        raise CheckError(f"{MC} doc {n}: the greedy option {greedy[0]} is not the lowest loss {best}: {losses}")
    if greedy and choices[best] != generated:
        raise CheckError(f"{MC} doc {n}: lowest-loss option {choices[best]!r} but generation said {generated!r}")
    if float(mc["acc"]) != float(choices[best] == doc["answer"]):
        raise CheckError(f"{MC} doc {n}: acc {mc['acc']} is not that of the lowest-loss option {choices[best]!r}")
    return bool(greedy)


def check(out: Path, limit: int) -> dict[str, float]:
    results = json.loads(_one(out, "*_results.json").read_text())
    metrics = {}
    for task, key in ((GEN, "exact_match,none"), (MC, "acc,none")):
        value = results.get("results", {}).get(task, {}).get(key)
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise CheckError(f"{task}: metric {key} is {value!r}, expected a number in [0, 1]")
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if n != limit:
            raise CheckError(f"{task}: evaluated on {n} docs, expected --limit {limit}")
        metrics[f"{task} {key.split(',')[0]}"] = value
    gen, mc = _samples(out, GEN), _samples(out, MC)
    if sorted(gen) != sorted(mc) or len(mc) != limit:
        raise CheckError(f"samples: doc ids {sorted(gen)} ({GEN}) and {sorted(mc)} ({MC}), expected {limit} each")
    docs = [json.loads(line) for line in (HERE / "scenes.jsonl").read_text().splitlines()]
    with_greedy = sum(check_doc(mc[d], docs[d], _text(gen[d]["filtered_resps"])) for d in mc)
    if 2 * with_greedy < limit:
        raise CheckError(f"{MC}: only {with_greedy} of {limit} docs have a greedy option (prompt misplaced?)")
    metrics["docs with a greedy option"] = with_greedy
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="lmms-eval's --output_path")
    p.add_argument("--limit", type=int, required=True, help="lmms-eval's --limit")
    args = p.parse_args(argv)
    try:
        metrics = check(args.out, args.limit)
    except CheckError as e:
        print(f"test-lmms: FAILED: {e}", file=sys.stderr)
        return 1
    print("test-lmms: ok: " + ", ".join(f"{k} = {v:.3g}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
