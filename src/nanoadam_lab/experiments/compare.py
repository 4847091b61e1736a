"""``nanoadam compare``: optimizers on GLUE tasks under one recipe, tuned honestly, with intervals.

Protocol (DESIGN.md section 5). Every run trains on the task's training subset minus a held-out
slice, with the shared recipe (warmup, linear decay, clipping; the final checkpoint scored), and
is scored on the held-out slice (for tuning and for the gate) and on the validation set (what is
reported), with the retention probe after training. For each task and optimizer: (1) seed 0 at
every rate of the optimizer's grid; a best rate at an edge of the grid extends it by the grid's
ratio, up to ``max_extensions`` times; the best held-out score wins, ties broken by the lower
held-out loss; (2) seeds 1 .. ``seeds - 1`` at the chosen rate (the same seed gives every
optimizer the same data order and head initialization). An optimizer may take a rate from
another's choice (``adamw-headlr``'s head trains at NanoAdam's chosen rate); it waits for it.

Each finished run is written atomically to ``out/runs/<task>/<optimizer>/lr<lr>[-...]-seed<s>.json``
as soon as it ends; a rerun of the same command skips every run whose file exists, so an
interrupted comparison resumes where it stopped. Runs execute one at a time in child processes
forked from a preloaded server (fresh memory accounting per run, no state leaking between runs).
``summarize`` reads the run files into the statistics (``analysis.stats``): per task, the gate
(AdamW against the trivial predictor and the head-only control on the held-out slice, by more
than two bootstrap standard errors), each optimizer's scores and retention over seeds, and paired
per-seed differences against AdamW with 95 % intervals; the average over the tasks that pass.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

from .._io import atomic_write_json
from ..analysis.frontier import retention_at_equal_score
from ..analysis.stats import bootstrap_difference, judged_difference
from .glue import GlueRunConfig, same_run
from .glue_data import TASKS
from .recipe import rate_beyond_edge

# Starting grids, three rates a factor 3 apart, extended at an edge. AdamW-like rates for the
# dense optimizers (MiniLM-L6 is small, so a little above BERT-base's usual 2e-5 .. 5e-5);
# NanoAdam and LIFT update 10 % of each tensor and get 10x (the paper, Appendix H.1); GaLore at
# scale 1 moves a rank-8 projection of each update; the head-only probe trains a linear layer.
LR_GRIDS: dict[str, list[float]] = {
    "adamw": [1e-5, 3e-5, 1e-4],
    "nanoadam": [1e-4, 3e-4, 1e-3],
    "lift": [1e-4, 3e-4, 1e-3],
    "head-only": [1e-3, 3e-3, 1e-2],
    "adamw-headlr": [1e-5, 3e-5, 1e-4],
    "adamw8bit": [1e-5, 3e-5, 1e-4],
    "galore": [1e-4, 3e-4, 1e-3],
    "microadam": [1e-5, 3e-5, 1e-4],
    "nanoadam-static": [1e-4, 3e-4, 1e-3],
}
PRIMARY = ["adamw", "nanoadam", "lift", "head-only", "adamw-headlr"]
SECONDARY = ["adamw8bit", "galore", "microadam", "nanoadam-static"]
# Rates an optimizer takes from another's choice: {optimizer: {hyperparameter: other optimizer}}.
RATE_TIES: dict[str, dict[str, str]] = {"adamw-headlr": {"head_lr": "nanoadam"}}

BUDGETS: dict[str, dict[str, Any]] = {
    # Sized from step times measured on 2 cores (batch 32, MiniLM-L6: CoLA 0.5 s, SST-2 1.0 s,
    # STS-B 1.5 s, MRPC 1.8 s, RTE 3 s): whole training sets but SST-2's (a 4000-example subset),
    # 3 epochs (RTE, the smallest, 5), 15 % held out of each for tuning and the gate.
    "standard": dict(train_limit=None, epochs=3.0, max_length=128, batch_size=32, heldout_fraction=0.15,
                     eval_points=2, per_task={"sst2": dict(train_limit=4000, epochs=2.0), "rte": dict(epochs=5.0)}),
    # A smoke test: 1000 examples, one short epoch. It cannot rank optimizers: CoLA, MRPC and RTE
    # stay at the majority class for every optimizer at this size.
    "quick": dict(train_limit=1000, epochs=1.0, max_length=64, batch_size=16, heldout_fraction=0.2, eval_points=1,
                  per_task={"sst2": dict(train_limit=2000), "stsb": dict(train_limit=1500)}),
    # The paper's settings (Appendix H.1): whole training sets, 5 epochs, batch 8; for a GPU.
    "paper": dict(train_limit=None, epochs=5.0, max_length=128, batch_size=8, heldout_fraction=0.1, eval_points=10),
}
BUDGET_NOTES = {
    "quick": "quick budget: a smoke test that cannot rank optimizers (most tasks do not learn at this size)",
    "standard": "standard budget",
    "paper": "the paper's budget",
}


def budget_settings(budget: str, task: str | None = None) -> dict[str, Any]:
    """The GlueRunConfig settings of ``budget`` for ``task`` (its per-task overrides applied)."""
    settings = {k: v for k, v in BUDGETS[budget].items() if k != "per_task"}
    settings.update(BUDGETS[budget].get("per_task", {}).get(task, {}))
    return settings


# Per-budget optimizer settings. The paper refreshes masks every 6 to 711 steps, a small fraction
# of each run (Table 13): standard runs have 170 to 700 steps, so masks refresh every 50; quick
# runs have 50 to 63, so every 10. GaLore's projection is recomputed four times a run.
BUDGET_OPTIMIZER_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "standard": {"nanoadam": {"mask_interval": 50}, "lift": {"mask_interval": 50},
                 "nanoadam-static": {}, "galore": {"proj_refreshes": 4}},
    "quick": {"nanoadam": {"mask_interval": 10}, "lift": {"mask_interval": 10}, "galore": {"proj_refreshes": 4}},
    "paper": {"galore": {"proj_refreshes": 4}},
}


@dataclass
class CompareConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    optimizers: list[str] = field(default_factory=lambda: list(PRIMARY))
    budget: str = "standard"
    seeds: int = 5
    model: str = "minilm"
    data_dir: str | None = None
    out: str = "results/glue"
    lr_grids: dict[str, list[float]] = field(default_factory=lambda: dict(LR_GRIDS))
    max_extensions: int = 3
    lora_r: int | None = None
    threads: int = 2
    overrides: dict[str, Any] = field(default_factory=dict)  # budget settings to override
    rate_ties: dict[str, dict[str, str]] = field(default_factory=lambda: dict(RATE_TIES))

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose from {', '.join(BUDGETS)}")
        missing = [o for o in self.optimizers if o not in self.lr_grids]
        if missing:
            raise ValueError(f"no learning-rate grid for {', '.join(missing)}")
        for optimizer, ties in self.rate_ties.items():
            absent = [other for other in ties.values() if optimizer in self.optimizers and other not in self.optimizers]
            if absent:
                raise ValueError(f"{optimizer} takes its {', '.join(ties)} from {', '.join(absent)}, "
                                 "which is not among the optimizers")

    def run_config(self, task: str, optimizer: str, lr: float, seed: int, tied: dict[str, float] | None = None
                   ) -> GlueRunConfig:
        settings = {**budget_settings(self.budget, task), **self.overrides}
        if seed != 0:
            settings["eval_points"] = 0  # curves from seed 0 only
        overrides = {**BUDGET_OPTIMIZER_OVERRIDES[self.budget].get(optimizer, {}), **(tied or {})}
        return GlueRunConfig(task=task, optimizer=optimizer, lr=lr, seed=seed, model=self.model,
                             data_dir=self.data_dir, lora_r=self.lora_r, threads=self.threads, eval_split="heldout",
                             optimizer_overrides=overrides, **settings)


def run_path(out: Path, task: str, optimizer: str, lr: float, seed: int, tied: dict[str, float] | None = None) -> Path:
    extra = "".join(f"-{k}{v:g}" for k, v in sorted((tied or {}).items()))
    return out / "runs" / task / optimizer / f"lr{lr:g}{extra}-seed{seed}.json"


def reuse_run(source: Path | None, config: GlueRunConfig, path: Path,
              rate_ties: dict[str, dict[str, str]] = RATE_TIES) -> bool:
    """Copies ``config``'s run file from another comparison's folder ``source`` to ``path`` when a
    run there was made with exactly these settings (``glue.same_run``); whether it did.
    ``rate_ties`` are the source comparison's: they name its files (the default ones unless it set others)."""
    if source is None or path.exists():
        return False
    tied = {k: config.optimizer_overrides[k] for k in rate_ties.get(config.optimizer, {})
            if k in config.optimizer_overrides}
    origin = run_path(source, config.task, config.optimizer, config.lr, config.seed, tied)
    if not origin.exists() or not same_run(json.loads(origin.read_text())["config"], config):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(origin, path)
    return True


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
        message, received = None, False
        while not received:  # read before joining: a child blocks on exit until its message is read
            try:
                message, received = queue.get(timeout=1.0), True
            except Empty:
                if not proc.is_alive():
                    break
        proc.join()
        if proc.exitcode != 0:
            return message or f"run process exited with code {proc.exitcode}"
        return message


def _heldout_loss(result: dict) -> float:
    loss = result.get("metrics", {}).get("loss")
    return loss if isinstance(loss, (int, float)) and loss == loss else math.inf


def usable(result: dict) -> bool:
    """A run whose score can choose a rate: finished, with a number, not diverged."""
    return result["score"] == result["score"] and not result.get("metrics", {}).get("diverged")


def best_lr(tuning: dict[float, dict]) -> float:
    """The learning rate with the best held-out score (NaN and diverged runs count as worst); equal
    scores go to the lower held-out loss, then the smaller rate."""
    def key(item):
        lr, result = item
        return (-(result["score"] if usable(result) else -math.inf), _heldout_loss(result), lr)

    return min(tuning.items(), key=key)[0]


def next_rate(tried: dict[float, dict], grid: list[float], max_extensions: int) -> float | None:
    """The next rate to try: the grid's first untried one; then, while the best rate sits at an
    edge of what was tried, one step beyond it by the ratio of the two rates at that edge (at
    most ``max_extensions`` steps); None when the search is settled."""
    for lr in grid:
        if lr not in tried:
            return lr
    rates = sorted(tried)
    if len(rates) - len(set(grid)) >= max_extensions or len(rates) < 2:
        return None
    best = best_lr(tried)
    if not usable(tried[best]):
        return None  # every run failed or diverged: nothing to follow
    step = rate_beyond_edge(rates, best)
    return None if step is None or step in tried else step  # rounding can land on a tried rate


def chosen_rate(tuning: dict[float, dict], grid: list[float], max_extensions: int) -> float | None:
    """The rate a settled search over ``grid`` chose from its runs (seed 0 per rate): None while
    it has not settled (``next_rate`` still proposes one) or when every run failed."""
    if not tuning or next_rate(tuning, grid, max_extensions) is not None:
        return None
    found = {rate: r for rate, r in tuning.items() if usable(r)}
    return best_lr(found) if found else None


def search_rate(ensure, grid: list[float], max_extensions: int) -> tuple[dict[float, dict], float | None]:
    """Runs a search: ``ensure(lr)`` (a run's result, or None when it failed) at each rate
    ``next_rate`` proposes; returns the runs tried and the chosen rate (None: every run failed)."""
    tried: dict[float, dict] = {}
    while (lr := next_rate(tried, grid, max_extensions)) is not None:
        tried[lr] = ensure(lr) or {"score": float("nan")}
    return tried, chosen_rate(tried, grid, max_extensions)


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
    """Runs whose median step took more than ``factor`` times the fastest run of the same task and
    optimizer: the same work, so such a run was slowed by something else on the machine."""
    groups: dict[Path, list[tuple[float, Path]]] = {}
    for path in sorted(out.glob("runs/*/*/*.json")):
        run = json.loads(path.read_text())
        groups.setdefault(path.parent, []).append((run["median_step_s"], path))
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
    """Moves every final run of ``tasks`` (the seeds of a chosen rate: a rate with more than one
    seed) aside, as ``retime`` does, so that the next ``run_compare`` reruns them with optimizers
    taking turns."""
    finals = []
    for task in tasks:
        by_rate: dict[tuple[Path, str], list[Path]] = {}
        for path in sorted(out.glob(f"runs/{task}/*/*.json")):
            by_rate.setdefault((path.parent, path.name.rsplit("-seed", 1)[0]), []).append(path)
        finals += [p for paths in by_rate.values() if len(paths) > 1 for p in paths]
    return _set_aside(out, finals)


def _tied(config: CompareConfig, optimizer: str, chosen: dict[str, float | None]) -> dict[str, float] | None:
    """The rates ``optimizer`` takes from others' choices ({} when none), or None while one is
    still being searched (or found no rate)."""
    ties = config.rate_ties.get(optimizer, {})
    if any(chosen.get(other) is None for other in ties.values()):
        return None
    return {key: chosen[other] for key, other in ties.items()}


def run_compare(config: CompareConfig, execute=None, progress=None) -> dict:
    """Runs (or resumes) the whole comparison; returns the summary (also written to out/summary.json)."""
    out = Path(config.out)
    planned = len(config.tasks) * sum(len(config.lr_grids[o]) + config.seeds - 1 for o in config.optimizers)
    ledger = RunLedger(planned, execute, progress)
    probe = config.run_config(config.tasks[0], config.optimizers[0], 1.0, 0)
    recorded = _load(out / "pretrained.json")
    settings = {"model": config.model, "probe_limit": probe.probe_limit, "max_length": probe.max_length,
                "lora_r": config.lora_r}
    if probe.retention_probe and (recorded is None or {k: recorded.get(k) for k in settings} != settings):
        from .glue import pretrained_retention

        _write_atomic(out / "pretrained.json", {"retention": pretrained_retention(probe), **settings})
    for task in config.tasks:
        tried: dict[str, dict[float, dict]] = {o: {} for o in config.optimizers}
        chosen: dict[str, float | None] = {}

        # Optimizers take turns (one rate of each, then the next; seed 1 of each, then seed 2) so that
        # a machine that slows down or speeds up during a task shifts every optimizer's step time alike.
        while len(chosen) < len(config.optimizers):
            progressed = False
            for optimizer in config.optimizers:
                if optimizer in chosen:
                    continue
                if any(chosen.get(o, 0) is None for o in config.rate_ties.get(optimizer, {}).values()):
                    chosen[optimizer] = None  # the rate it takes was never found (its runs failed)
                    progressed = True
                    continue
                if (ties := _tied(config, optimizer, chosen)) is None:
                    continue
                lr = next_rate(tried[optimizer], config.lr_grids[optimizer], config.max_extensions)
                if lr is None:  # settled: the chosen rate, or None when every run failed
                    chosen[optimizer] = chosen_rate(tried[optimizer], config.lr_grids[optimizer], config.max_extensions)
                    progressed = True
                    continue
                result = ledger.ensure(config.run_config(task, optimizer, lr, 0, ties),
                                       run_path(out, task, optimizer, lr, 0, ties))
                tried[optimizer][lr] = result if result is not None else {"score": float("nan")}
                progressed = True
            if not progressed:
                waiting = ", ".join(o for o in config.optimizers if o not in chosen)
                raise RuntimeError(f"rate ties form a cycle among {waiting}")
        for seed in range(1, config.seeds):
            for optimizer in config.optimizers:
                lr = chosen[optimizer]
                if lr is not None:
                    ties = _tied(config, optimizer, chosen)
                    ledger.ensure(config.run_config(task, optimizer, lr, seed, ties),
                                  run_path(out, task, optimizer, lr, seed, ties))
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


def _runs(out: Path, task: str, optimizer: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs" / task / optimizer).glob("*.json"))]


def _grid_row(run: dict) -> dict:
    return {"lr": run["config"]["lr"], "heldout": run["score"], "heldout_loss": _heldout_loss(run),
            "validation": run.get("validation", {}).get("score"), "retention": run.get("retention"),
            "optimizer_overrides": run["config"]["optimizer_overrides"]}


def _cell(runs: list[dict], grid: list[float], max_extensions: int, seeds: int,
          tied: dict[str, float] | None = None) -> dict | None:
    """One optimizer on one task: its search (seed 0 of every rate), the chosen rate and its seeds.
    Only runs of this comparison count: seeds below ``seeds`` and, for an optimizer that takes a
    rate from another's choice, runs made with the rate chosen now (``tied``)."""
    runs = [r for r in runs if r["config"]["seed"] < seeds and all(
        r["config"]["optimizer_overrides"].get(k) == v for k, v in (tied or {}).items())]
    tuning = {r["config"]["lr"]: r for r in runs if r["config"]["seed"] == 0}
    lr = chosen_rate(tuning, grid, max_extensions)  # as run_compare chooses
    if lr is None:
        return None  # the search has not settled yet, or every rate failed
    finals = sorted((r for r in runs if r["config"]["lr"] == lr and "validation" in r),
                    key=lambda r: r["config"]["seed"])
    rates = sorted(tuning)
    scores = [r["validation"]["score"] for r in finals]
    retention = [r["retention"] for r in finals]
    return {
        "lr": lr,
        "at_edge": lr in (rates[0], rates[-1]),  # the search ran out of extensions at an edge
        "grid": [_grid_row(tuning[x]) for x in rates],
        "seeds": [r["config"]["seed"] for r in finals],
        "scores": scores,
        "heldout_scores": [r["score"] for r in finals],
        "retention": retention,
        "mean": statistics.fmean(scores) if scores else float("nan"),
        "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "retention_mean": statistics.fmean(x for x in retention if x is not None) if any(
            x is not None for x in retention) else None,
        "metrics": {k: statistics.fmean(r["validation"][k] for r in finals)
                    for k in finals[0]["validation"] if isinstance(finals[0]["validation"][k], (int, float))
                    and k != "trivial_prediction"} if finals else {},
        "median_step_s": statistics.fmean(r["median_step_s"] for r in finals) if finals else None,
        "median_optimizer_step_s": statistics.fmean(r["median_optimizer_step_s"] for r in finals) if finals else None,
        "peak_memory_increase_mb": _mean_or_none(r["peak_memory_increase_mb"] for r in finals),
        "untouched_fraction": statistics.fmean(r["untouched_fraction"] for r in finals) if finals else None,
        "l2_shift": statistics.fmean(r["l2_shift"] for r in finals) if finals else None,
        "steps": finals[0]["steps"] if finals else None,
        "train_examples": finals[0]["train_examples"] if finals else None,
        "heldout_examples": len(finals[0]["heldout"]["labels"]) if finals else None,
        "_finals": finals,
    }


def _paired(cell: dict, reference: dict, key: str) -> dict:
    """Per-seed differences ``cell - reference`` of ``key`` over the seeds both have, with its interval."""
    mine = dict(zip(cell["seeds"], cell[key]))
    theirs = dict(zip(reference["seeds"], reference[key]))
    common = sorted(set(mine) & set(theirs))
    return judged_difference([mine[s] - theirs[s] for s in common if mine[s] is not None and theirs[s] is not None])


def gate(task: str, cells: dict[str, dict], seeds: int) -> dict:
    """Whether ``task`` learns: AdamW beats the trivial predictor and the head-only control on the
    held-out slice by more than two standard errors (bootstrap over the slice's examples, paired,
    every final seed). Incomplete cells leave the gate undecided."""
    metric = TASKS[task].metric
    adamw, head = cells.get("adamw"), cells.get("head-only")
    if adamw is None or len(adamw["_finals"]) < seeds:
        return {"passed": None, "reason": "AdamW's runs are not finished"}
    labels = adamw["_finals"][0]["heldout"]["labels"]
    mine = [r["heldout"]["predictions"] for r in adamw["_finals"]]
    trivial = [[adamw["_finals"][0]["heldout"]["trivial_prediction"]] * len(labels)]
    out = {"metric": metric, "vs_trivial": bootstrap_difference(metric, mine, trivial, labels)}
    if head is None or len(head["_finals"]) < seeds:
        return {**out, "passed": None, "reason": "the head-only control's runs are not finished"}
    out["vs_head_only"] = bootstrap_difference(metric, mine, [r["heldout"]["predictions"] for r in head["_finals"]],
                                               labels)
    failed = [name for name in ("vs_trivial", "vs_head_only") if not out[name]["difference"] > 2 * out[name]["se"]]
    reason = "; ".join(f"AdamW {name.replace('_', ' ').replace('vs', 'vs.')}: {100 * out[name]['difference']:+.2f} "
                       f"(2 SE = {200 * out[name]['se']:.2f})" for name in failed)
    return {**out, "passed": not failed, "reason": reason or None}


def summarize(config: CompareConfig) -> dict:
    """Reads every finished run under ``config.out`` into per task/optimizer statistics."""
    out = Path(config.out)
    tasks: dict[str, dict[str, Any]] = {}
    finished_runs, train_seconds_total = 0, 0.0
    steps = _load(out / "steps.json")  # `nanoadam bench glue`: step times taken in turn
    reference = steps["config"]["reference"] if steps else None
    for task in config.tasks:
        cells, partial = {}, {}
        # Optimizers that take a rate from another's choice come after the one they take it from.
        ordered = sorted(config.optimizers, key=lambda o: o in config.rate_ties)
        for optimizer in ordered:
            runs = _runs(out, task, optimizer)
            finished_runs += len(runs)
            train_seconds_total += sum(r["train_seconds"] for r in runs)
            ties = config.rate_ties.get(optimizer, {})
            if any(other not in cells for other in ties.values()):
                continue  # the rate it takes is not chosen yet
            tied = {key: cells[other]["lr"] for key, other in ties.items()}
            cell = _cell(runs, config.lr_grids[optimizer], config.max_extensions, config.seeds, tied)
            if cell is not None:
                cells[optimizer] = cell
            elif runs:  # still searching: what is finished, for the record
                partial[optimizer] = [_grid_row(r) for r in sorted(runs, key=lambda r: r["config"]["lr"])
                                      if r["config"]["seed"] == 0]
        cells = {o: cells[o] for o in config.optimizers if o in cells}
        if "adamw" in cells:
            for optimizer, cell in cells.items():
                if optimizer != "adamw":
                    cell["vs_adamw"] = {"score": _paired(cell, cells["adamw"], "scores"),
                                        "retention": _paired(cell, cells["adamw"], "retention"),
                                        "retention_at_equal_score": retention_at_equal_score(cell, cells["adamw"])}
        task_gate = gate(task, cells, config.seeds)
        timed = (steps or {}).get("tasks", {}).get(task, {}).get("results", {})
        for optimizer, cell in cells.items():
            finals = cell.pop("_finals")
            cell["timed_in_turn"] = _timed_in_turn(timed.get(optimizer), cell["lr"], finals, reference)
        tasks[task] = {"gate": task_gate, "cells": cells, "searching": partial}
    pretrained = _load(out / "pretrained.json")
    return {"config": asdict(config), "budget_note": BUDGET_NOTES[config.budget],
            "pretrained_retention": pretrained["retention"] if pretrained else None, "tasks": tasks,
            "average": average(config, tasks), "finished_runs": finished_runs,
            "train_seconds_total": train_seconds_total}


def _timed_in_turn(timed: dict | None, lr: float, finals: list[dict], reference: str | None) -> dict | None:
    """The benchmark's step time of this cell (``bench.glue_steps``), when it timed the chosen rate
    with every setting of the cell's seed-0 run but the data folder's path; None otherwise (not
    timed, or timed at another choice, budget, shape or thread count)."""
    if not timed or timed["lr"] != lr or not finals or "run_config" not in timed:
        return None
    cell_run = GlueRunConfig(**{**finals[0]["config"], "data_dir": None})
    if not same_run({**timed["run_config"], "data_dir": None}, cell_run):
        return None
    ratios = timed["block_ratios"]
    return {"median_step_s": timed["median_step_s"], "ratio": timed[f"ratio_to_{reference}"], "reference": reference,
            "ratio_range": [min(ratios), max(ratios)]}


def average(config: CompareConfig, tasks: dict[str, dict]) -> dict:
    """Per optimizer, the mean over the tasks that pass the gate, per seed, and its paired
    difference against AdamW; tasks that fail or are undecided are listed apart with the reason."""
    included = [t for t in config.tasks if tasks[t]["gate"]["passed"]]
    excluded = {t: tasks[t]["gate"]["reason"] or "gate undecided" for t in config.tasks if t not in included}
    per_seed: dict[str, dict[int, float]] = {}
    for optimizer in config.optimizers:
        cells = [tasks[t]["cells"].get(optimizer) for t in included]
        if not included or any(c is None for c in cells):
            continue
        common = set.intersection(*(set(c["seeds"]) for c in cells))
        per_seed[optimizer] = {s: statistics.fmean(dict(zip(c["seeds"], c["scores"]))[s] for c in cells)
                               for s in sorted(common)}
    rows = {}
    for optimizer, by_seed in per_seed.items():
        row = {"mean": statistics.fmean(by_seed.values()) if by_seed else float("nan"), "seeds": sorted(by_seed)}
        if optimizer != "adamw" and "adamw" in per_seed:
            common = sorted(set(by_seed) & set(per_seed["adamw"]))
            row["vs_adamw"] = judged_difference([by_seed[s] - per_seed["adamw"][s] for s in common])
        rows[optimizer] = row
    return {"tasks": included, "excluded": excluded, "optimizers": rows}


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None
