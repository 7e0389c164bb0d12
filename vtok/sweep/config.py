"""A sweep's configuration and its grid: methods × keeps × placements × models × tasks × seeds.

A config is a YAML mapping (or a dict); every key and value is checked before any cell runs, and a bad one raises
``ValueError`` naming the key and the value (unknown method, keep outside ``(0, 1]`` or a count below 1, unknown task
or model, a task option of the wrong type or out of range, a method the placement cannot feed on that model,
malformed YAML)::

    name: demo
    tasks: [eval_vit]                 # registered tasks: vtok.sweep.tasks.TASKS
    models: [eval_vit]                # per task: a name it knows or a path (checkpoint file / HF folder)
    methods: [random, divprune]
    keeps: [0.5, 0.25]                # ratios in (0, 1] or int counts
    placements: [inside, after]       # default: the task's own placements
    seeds: [0]
    method_options: {divprune: {}}    # extra keyword options per method
    task_options: {eval_vit: {limit: 500, batch: 250}}   # each task's declared options: type and range checked
    shard_size: 8                     # cells a worker runs together (they share the unpruned forward)
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vtok.budget import check_keep, keep_from_text

KEYS = ("name", "tasks", "models", "methods", "keeps", "placements", "seeds", "method_options", "task_options",
        "shard_size")


@dataclass(frozen=True)
class Cell:
    """One point of the grid. ``id`` hashes everything that decides its metrics (and the model's fingerprint)."""

    task: str
    model: str
    method: str
    keep: float | int
    placement: str
    seed: int
    options: dict = field(default_factory=dict)
    task_options: dict = field(default_factory=dict)
    fingerprint: str = ""

    def key(self) -> dict[str, Any]:
        """The cell as a plain dict (what a result row stores under ``cell``)."""
        return asdict(self)

    @property
    def id(self) -> str:
        blob = json.dumps(self.key(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.task}/{Path(self.model).name} {self.method} keep={self.keep} {self.placement} seed={self.seed}"


@dataclass
class SweepConfig:
    """A validated sweep. Build with ``load_config``; ``cells()`` expands the grid in a fixed order."""

    name: str
    tasks: list[str]
    models: list[str]
    methods: list[str]
    keeps: list[float | int]
    placements: list[str] | None
    seeds: list[int]
    method_options: dict[str, dict]
    task_options: dict[str, dict]
    shard_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cells(self) -> list[Cell]:
        """Every cell: per task (its options resolved), model, method, keep, placement, seed."""
        from vtok.sweep.tasks import get_task

        out = []
        for tname in self.tasks:
            task = get_task(tname)
            topts = task.resolve_options(self.task_options.get(tname, {}))
            for model in self.models:
                fp = task.fingerprint(model)
                for method in self.methods:
                    for keep in self.keeps:
                        for placement in self.placements or task.placements:
                            for seed in self.seeds:
                                out.append(Cell(tname, model, method, keep, placement, seed,
                                                dict(self.method_options.get(method, {})), topts, fp))
        return out


def _as_list(key: str, value: Any) -> list:
    if value is None:
        raise ValueError(f"{key}: expected a value or a list, got nothing")
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        value = [value]
    if not value:
        raise ValueError(f"{key}: expected at least one value, got an empty list")
    return list(value)


def _check_keep(value: Any) -> float | int:
    """A ``keeps`` entry (a number, or text as ``--keep`` takes it) checked by ``budget.check_keep``."""
    if isinstance(value, str):
        try:
            value = keep_from_text(value)
        except ValueError:
            raise ValueError(f"keeps: {value!r} is not a number (a ratio in (0, 1] or an int count >= 1)") from None
    try:
        return check_keep(value, "keeps")
    except TypeError:
        raise ValueError(f"keeps: {value!r} is not a number (a ratio in (0, 1] or an int count >= 1)") from None


def parse_yaml(text: str, source: str = "<config>") -> dict:
    """The YAML mapping in ``text``; malformed YAML or a non-mapping raises ``ValueError`` naming ``source``."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: malformed YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a YAML mapping of {list(KEYS)}, got {type(data).__name__}")
    return data


def load_config(source: str | Path | dict | None = None, **overrides: Any) -> SweepConfig:
    """Read (a YAML file, or a dict), apply command-line ``overrides`` (``None`` values ignored), validate.

    Every check happens here, before any cell runs. Raises ``ValueError`` naming the offending key and value."""
    import vtok
    from vtok.sweep.tasks import get_task

    if source is None:
        raw: dict = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"config: {path} is not a file")
        raw = parse_yaml(path.read_text(), str(path))
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("task_options", "method_options") and isinstance(value, dict) and isinstance(raw.get(key), dict):
            merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw[key].items()}
            for name, opts in value.items():  # command-line options update the config's, option by option
                merged[name] = {**merged.get(name, {}), **opts} if isinstance(merged.get(name), dict) else opts
            value = merged
        raw[key] = value
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; known keys: {list(KEYS)}")
    for key in ("tasks", "models", "methods", "keeps"):
        if key not in raw:
            raise ValueError(f"{key}: missing (give it in the config or on the command line)")

    tasks = [str(t) for t in _as_list("tasks", raw["tasks"])]
    task_objs = {t: get_task(t) for t in tasks}  # unknown task: ValueError naming it
    methods = [str(m) for m in _as_list("methods", raw["methods"])]
    known = {m.name for m in vtok.methods()}
    for m in methods:
        if m not in known:
            raise ValueError(f"methods: unknown method {m!r}; registered: {sorted(known)}")
    keeps = [_check_keep(k) for k in _as_list("keeps", raw["keeps"])]
    models = [str(m) for m in _as_list("models", raw["models"])]
    placements = None if raw.get("placements") is None else [str(p) for p in _as_list("placements",
                                                                                      raw["placements"])]
    seeds = _as_list("seeds", raw.get("seeds", [0]))
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise ValueError(f"seeds: {s!r} is not an int")
    method_options = raw.get("method_options") or {}
    if not isinstance(method_options, dict) or not all(isinstance(v, dict) for v in method_options.values()):
        raise ValueError(f"method_options: expected a mapping method -> {{option: value}}, got {method_options!r}")
    for m, opts in method_options.items():
        info = vtok.get_method(m) if m in known else None
        if info is None:
            raise ValueError(f"method_options: unknown method {m!r}")
        bad = sorted(set(opts) - set(info.options))
        if bad:
            raise ValueError(f"method_options.{m}: unknown option(s) {bad}; its options: {sorted(info.options)}")
    task_options = raw.get("task_options") or {}
    if not isinstance(task_options, dict) or not all(isinstance(v, dict) for v in task_options.values()):
        raise ValueError(f"task_options: expected a mapping task -> {{option: value}}, got {task_options!r}")
    for t in task_options:
        if t not in task_objs:
            raise ValueError(f"task_options: {t!r} is not one of this sweep's tasks {tasks}")
    shard = raw.get("shard_size", 8)
    if isinstance(shard, bool) or not isinstance(shard, numbers.Integral) or shard < 1:
        raise ValueError(f"shard_size: expected an int >= 1, got {shard!r}")
    name = str(raw.get("name", "sweep"))

    for t, task in task_objs.items():
        opts = task.resolve_options(task_options.get(t, {}))  # unknown option, wrong type, out of range: named
        for p in placements or task.placements:
            task.check_placement(p)
            for m in methods:
                task.check_method(m, p)
        for model in models:
            task.check_model(model, opts)
            for m in methods:
                for keep in keeps:
                    for p in placements or task.placements:
                        task.check_cell(model, m, keep, p, dict(method_options.get(m, {})))
    return SweepConfig(name, tasks, models, methods, keeps, placements, [int(s) for s in seeds],
                       {k: dict(v) for k, v in method_options.items()}, {k: dict(v) for k, v in task_options.items()},
                       int(shard))
