"""``nanoadam compare``: every optimizer on every task, learning rate tuned per optimizer and task.

Protocol. For each task and optimizer: (1) tuning, one run per learning rate of the optimizer's
grid, trained on the training subset minus a held-out slice and scored on that slice (never on
the validation set that is reported); (2) the best learning rate (ties: the smaller) rerun with
``seeds`` seeds on the whole training subset, scored on the validation set; mean and standard
deviation are reported. Every optimizer sees the same examples in the same order for a given
seed, with the same batch size and number of steps.

Each finished run is written atomically to ``out/runs/<task>/<optimizer>/<phase>-....json`` as
soon as it ends; a rerun of the same command skips every run whose file exists, so an interrupted
comparison resumes where it stopped. Runs execute one at a time in child processes forked from a
preloaded server (fresh memory accounting per run, no state leaking between runs).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from .glue import GlueRunConfig
from .glue_data import TASKS

# Learning-rate grids, three values a factor ~3 apart, placed per method: NanoAdam updates a few
# small weights and, as in the paper (Appendix H.1), gets larger rates; GaLore at scale 1 moves
# only a rank-8 projection of each update and also needs larger ones; MicroAdam's update, rebuilt
# from a 10-step window with Adam's bias correction, is several times Adam's, so it gets smaller.
LR_GRIDS: dict[str, list[float]] = {
    "adamw": [3e-5, 8e-5, 2e-4],
    "adamw8bit": [3e-5, 8e-5, 2e-4],
    "galore": [1.5e-4, 5e-4, 1.5e-3],
    "microadam": [5e-5, 1.5e-4, 5e-4],
    "nanoadam": [3e-4, 1e-3, 3e-3],
    "nanoadam-static": [3e-4, 1e-3, 3e-3],
}

BUDGETS: dict[str, dict[str, Any]] = {
    # On 2 CPU cores, sized so the 5-task x 6-optimizer grid (36 runs per task) fits about 3 hours.
    # SST-2 learns within 125 steps; STS-B gets 94. CoLA, MRPC and RTE stay at the majority class /
    # chance for every optimizer at budgets this machine affords (CoLA and RTE measured up to 250
    # steps; MRPC needs about 250 before any optimizer beats the majority class), so they get
    # 63-step runs: their rows show the budget's limits, not the optimizers'.
    "quick": dict(train_limit=1000, epochs=1.0, max_length=64, batch_size=16, eval_points=1,
                  per_task={"sst2": dict(train_limit=2000), "stsb": dict(train_limit=1500)}),
    # The paper's settings (Appendix H.1): whole training sets, 5 epochs, batch 8; for a GPU.
    "paper": dict(train_limit=None, epochs=5.0, max_length=128, batch_size=8, eval_points=10),
}


def budget_settings(budget: str, task: str | None = None) -> dict[str, Any]:
    """The GlueRunConfig settings of ``budget`` for ``task`` (its per-task overrides applied)."""
    settings = {k: v for k, v in BUDGETS[budget].items() if k != "per_task"}
    settings.update(BUDGETS[budget].get("per_task", {}).get(task, {}))
    return settings


# Per-budget optimizer settings. The paper refreshes masks every 6 to 711 steps, a small fraction
# of each run (Table 13); a quick run has 50 to 63 steps, so NanoAdam's dynamic mask refreshes every
# 10 (the default 100 would make it the static ablation). Density stays at 0.1 (no decay).
BUDGET_OPTIMIZER_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {"nanoadam": {"mask_interval": 10}},
    "paper": {},
}


@dataclass
class CompareConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    optimizers: list[str] = field(default_factory=lambda: list(LR_GRIDS))
    budget: str = "quick"
    seeds: int = 3
    model: str = "minilm"
    data_dir: str | None = None
    out: str = "results/glue"
    lr_grids: dict[str, list[float]] = field(default_factory=lambda: dict(LR_GRIDS))
    lora_r: int | None = None
    threads: int = 2
    overrides: dict[str, Any] = field(default_factory=dict)  # budget settings to override

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose from {', '.join(BUDGETS)}")
        missing = [o for o in self.optimizers if o not in self.lr_grids]
        if missing:
            raise ValueError(f"no learning-rate grid for {', '.join(missing)}")

    def run_config(self, task: str, optimizer: str, lr: float, seed: int, phase: str) -> GlueRunConfig:
        settings = {**budget_settings(self.budget, task), **self.overrides}
        if phase == "tune":
            settings["eval_points"] = 0  # held-out score at the end only
        return GlueRunConfig(task=task, optimizer=optimizer, lr=lr, seed=seed, model=self.model,
                             data_dir=self.data_dir, lora_r=self.lora_r, threads=self.threads,
                             eval_split="heldout" if phase == "tune" else "validation",
                             optimizer_overrides=dict(BUDGET_OPTIMIZER_OVERRIDES[self.budget].get(optimizer, {})),
                             **settings)


def run_path(out: Path, task: str, optimizer: str, phase: str, lr: float, seed: int) -> Path:
    return out / "runs" / task / optimizer / f"{phase}-lr{lr:g}-seed{seed}.json"


def _write_atomic(path: Path, data: dict) -> None:
    atomic_write_json(path, data, default=float)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _child(config_dict: dict, path: str, queue) -> None:
    from .glue import run

    try:
        _write_atomic(Path(path), run(GlueRunConfig(**config_dict)))
        queue.put(None)
    except Exception as e:  # reported to the parent, which records the failure
        queue.put(f"{type(e).__name__}: {e}")


class RunExecutor:
    """Runs one GlueRunConfig at a time in a child forked from a preloaded server."""

    def __init__(self):
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "transformers", "nanoadam_lab.experiments.glue"])

    def __call__(self, config: GlueRunConfig, path: Path) -> str | None:
        queue = self.ctx.Queue()
        proc = self.ctx.Process(target=_child, args=(asdict(config), str(path), queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            return f"run process exited with code {proc.exitcode}"
        return queue.get()


def best_lr(tuning: dict[float, dict]) -> float:
    """The learning rate with the best held-out score (NaN counts as worst; ties: the smaller)."""
    def key(item):
        lr, result = item
        score = result["score"]
        return (-(score if score == score else -math.inf), lr)

    return min(tuning.items(), key=key)[0]


class RunLedger:
    """Runs each planned GlueRunConfig once: a run whose file exists is read back instead, a new
    one is executed and written atomically; failures are collected, progress reported."""

    def __init__(self, planned: int, execute=None, progress=None):
        self.planned, self.execute, self.progress = planned, execute or RunExecutor(), progress
        self.done = 0
        self.failures: list[dict] = []

    def ensure(self, config: GlueRunConfig, path: Path) -> dict | None:
        result = _load(path)
        if result is None:
            error = self.execute(config, path)
            if error:
                self.failures.append({"run": str(path), "error": error})
            result = _load(path)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.planned, path)
        return result


def slow_runs(out: Path, factor: float) -> list[Path]:
    """Runs whose median step took more than ``factor`` times the fastest run of the same task,
    optimizer and phase: the same work, so such a run was slowed by something else on the machine."""
    groups: dict[tuple, list[tuple[float, Path]]] = {}
    for path in sorted(out.glob("runs/*/*/*.json")):
        run = json.loads(path.read_text())
        key = (path.parent, path.name.split("-")[0])
        groups.setdefault(key, []).append((run["median_step_s"], path))
    slow = []
    for runs in groups.values():
        fastest = min(t for t, _ in runs)
        slow += [p for t, p in runs if t > factor * fastest]
    return slow


def retime(out: Path, factor: float) -> list[dict]:
    """Moves slow runs (see ``slow_runs``) aside so that the next ``run_compare`` reruns them;
    returns what was moved, with the old timing and score, for the record."""
    return _set_aside(out, slow_runs(out, factor))


def _set_aside(out: Path, paths: list[Path]) -> list[dict]:
    moved = []
    for path in paths:
        run = json.loads(path.read_text())
        moved.append({"run": str(path.relative_to(out)), "old_median_step_s": run["median_step_s"],
                      "old_score": run["score"]})
        path.replace(path.with_name(path.name + ".slow"))
    return moved


def retime_finals(out: Path, tasks: list[str]) -> list[dict]:
    """Moves every final run of ``tasks`` aside (as ``retime`` does) so that the next
    ``run_compare`` reruns them with optimizers taking turns: for grids first run one optimizer
    after another, whose step times then carry the machine's drift over the task."""
    return _set_aside(out, [p for task in tasks for p in sorted(out.glob(f"runs/{task}/*/final-*.json"))])


def run_compare(config: CompareConfig, execute=None, progress=None) -> dict:
    """Runs (or resumes) the whole grid; returns the summary (also written to out/summary.json)."""
    out = Path(config.out)
    planned = len(config.tasks) * sum(len(config.lr_grids[o]) + config.seeds for o in config.optimizers)
    ledger = RunLedger(planned, execute, progress)
    for task in config.tasks:
        # Optimizers take turns (one rate of each, then the next; seed 0 of each, then seed 1) so that a
        # machine that slows down or speeds up during a task's runs shifts every optimizer's step time
        # alike instead of the ones that happen to run last.
        tuning: dict[str, dict[float, dict]] = {o: {} for o in config.optimizers}
        for turn in range(max(len(config.lr_grids[o]) for o in config.optimizers)):
            for optimizer in config.optimizers:
                grid = config.lr_grids[optimizer]
                if turn < len(grid):
                    result = ledger.ensure(config.run_config(task, optimizer, grid[turn], 0, "tune"),
                                           run_path(out, task, optimizer, "tune", grid[turn], 0))
                    if result is not None:
                        tuning[optimizer][grid[turn]] = result
        chosen = {o: best_lr(t) for o, t in tuning.items() if t}
        for seed in range(config.seeds):
            for optimizer, lr in chosen.items():
                ledger.ensure(config.run_config(task, optimizer, lr, seed, "final"),
                              run_path(out, task, optimizer, "final", lr, seed))
    summary = summarize(config)
    summary["failures"] = ledger.failures
    summary["retimed"] = _retimed(out)
    _write_atomic(out / "summary.json", summary)
    return summary


def _retimed(out: Path) -> list[dict]:
    """Runs rerun because their first timing was disturbed: old and new step time and score."""
    rows = []
    for old_path in sorted(out.glob("runs/*/*/*.json.slow")):
        new_path = old_path.with_name(old_path.name.removesuffix(".slow"))
        old = json.loads(old_path.read_text())
        new = _load(new_path)
        rows.append({"run": str(new_path.relative_to(out)), "old_median_step_s": old["median_step_s"],
                     "new_median_step_s": new["median_step_s"] if new else None, "old_score": old["score"],
                     "new_score": new["score"] if new else None})
    return rows


def summarize(config: CompareConfig) -> dict:
    """Reads every finished run under ``config.out`` into per task/optimizer statistics."""
    out = Path(config.out)
    cells: dict[str, dict[str, Any]] = {}
    finished_runs, train_seconds_total = 0, 0.0
    for task in config.tasks:
        for optimizer in config.optimizers:
            runs = {p.name: json.loads(p.read_text()) for p in sorted((out / "runs" / task / optimizer).glob("*.json"))}
            finished_runs += len(runs)
            train_seconds_total += sum(r["train_seconds"] for r in runs.values())
            tunes = {r["config"]["lr"]: r for name, r in runs.items() if name.startswith("tune-")}
            finals = [r for name, r in runs.items() if name.startswith("final-")]
            if not finals:
                continue
            scores = [r["score"] for r in finals]
            cells.setdefault(task, {})[optimizer] = {
                "lr": finals[0]["config"]["lr"],
                "tuning": {str(lr): r["score"] for lr, r in sorted(tunes.items())},
                "scores": scores,
                "mean": statistics.fmean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "metrics": {k: statistics.fmean(r["metrics"][k] for r in finals)
                            for k in finals[0]["metrics"] if isinstance(finals[0]["metrics"][k], (int, float))},
                "median_step_s": statistics.fmean(r["median_step_s"] for r in finals),
                "median_optimizer_step_s": statistics.fmean(r["median_optimizer_step_s"] for r in finals),
                "peak_memory_increase_mb": _mean_or_none(r["peak_memory_increase_mb"] for r in finals),
                "untouched_fraction": statistics.fmean(r["untouched_fraction"] for r in finals),
                "l2_shift": statistics.fmean(r["l2_shift"] for r in finals),
                "steps": finals[0]["steps"],
                "train_examples": finals[0]["train_examples"],
            }
    averages = {}
    for optimizer in config.optimizers:
        per_task = [cells[t][optimizer]["mean"] for t in config.tasks if optimizer in cells.get(t, {})]
        if len(per_task) == len(config.tasks):
            averages[optimizer] = statistics.fmean(per_task)
    return {"config": asdict(config), "cells": cells, "average": averages, "finished_runs": finished_runs,
            "train_seconds_total": train_seconds_total}


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None
