"""``nanoadam reproduce continual-glue``: language continual finetuning with frontiers (DESIGN.md section 5).

The question of the vision experiment (``continual``) on MiniLM: at equal success on a second
GLUE task, does an optimizer keep more of the first? Each method (a registry optimizer, none
special-cased) finetunes MiniLM on task 1 (default SST-2), then the result on task 2 (default
CoLA, with a new head), and task 1 is scored along the way with its own head reloaded
(``GlueRunConfig.watch_task``): before task 2, at ``task2_eval_points`` points during it and at
its end, on task 1's held-out slice and its validation set. Before and after, task 1 is also
scored with its head's offset refit and with a linear probe refit on the body (``refit``): task 2
shifts the old head's logits as a whole, and the old head alone then reads chance while the body
still separates task 1's classes (measured: 52.8 against 85.8 and 85.5; see ``refit``). The zero-shot STS-B probe of the
GLUE comparison (``retention``) is measured after each run as well. Every run uses the GLUE
comparison's recipe, budget, held-out slices and batch order (``compare.CompareConfig.run_config``).

Protocol:

* Task-1 rate: ``compare``'s search (seed 0 over the method's grid, extended at an edge, best
  held-out task-1 score, ties to the lower held-out loss). ``reuse``: a comparison's folder whose
  identical runs are copied instead of run again. Then every seed trains task 1 at that rate and
  saves its model (``checkpoints``; not committed, about 90 MB each, and rebuilt when missing: a
  rebuilt model whose fingerprint differs from the one its task-2 runs started from is flagged).
* Task 2 from each method's own task-1 model of the same seed: seed 0 over the method's grid with
  the same search, by held-out task-2 score; seeds below ``frontier_seeds`` at every rate it
  tried (the frontier); every seed at the chosen rate (the paired comparison).
* Summary: per method and task-2 rate, the means of task-2 validation score, task-1 validation
  score after task 2 and the STS-B probe (the frontier); at the chosen rates, per-seed paired
  differences against AdamW with 95 % t-intervals (task 2, task 1 after, forgetting = before
  minus after, the probe) and retention at equal task-2 score against AdamW's frontier
  (``analysis.frontier``). ``head-only`` is the control: the body never moves, so task 1 after is
  task 1 before and the probe stays at the pretrained model's.

Run files go to ``out/runs/{task1,task1-saved,task2}/<method>/lr<lr>-seed<s>.json`` as they finish;
a rerun of the same command skips every run whose file exists. Seed 0 of every method runs first,
then seed 1 of every method, and so on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import experiment as ex
from ..analysis.frontier import paired_dominance, retention_at_equal_score
from ..analysis.stats import judged_difference
from ..experiment import percent, percent_interval, percent_mean_std
from .compare import (
    BUDGETS,
    LR_GRIDS,
    RATE_TIES,
    CompareConfig,
    RunLedger,
    _load,
    _mean_or_none,
    chosen_rate,
    gate,
    next_rate,
    reuse_run,
    search_rate,
)
from .glue import GlueRunConfig
from .glue_data import TASKS
from .report import gate_line

METHODS = ["adamw", "nanoadam", "lift", "head-only"]
REFERENCE = "adamw"


@dataclass
class ContinualGlueConfig:
    task1: str = "sst2"
    task2: str = "cola"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    budget: str = "standard"
    seeds: int = 5
    frontier_seeds: int = 3  # seeds at every task-2 rate tried (the frontier); all seeds at the chosen one
    model: str = "minilm"
    data_dir: str | None = None
    out: str = "results/continual-glue"
    checkpoints: str | None = None  # task-1 models (default: out/checkpoints)
    lr_grids: dict[str, list[float]] = field(default_factory=lambda: {m: list(g) for m, g in LR_GRIDS.items()})
    max_extensions: int = 3
    task2_eval_points: int = 4  # task 1 scored at this many points during task 2, besides before and after
    threads: int = 2
    overrides: dict[str, Any] = field(default_factory=dict)  # budget settings to override (tests)
    reuse: str | None = None  # a `nanoadam compare` folder whose identical task-1 runs are copied

    def __post_init__(self):
        for name in ("task1", "task2"):
            if getattr(self, name) not in TASKS:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(TASKS)}")
        if self.task1 == self.task2:
            raise ValueError("task1 and task2 must differ")
        if TASKS[self.task1].num_labels != TASKS[self.task2].num_labels:
            raise ValueError(f"{self.task1} and {self.task2} have different label counts: task 1's head could "
                             "not be reloaded into the task-2 model")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose from {', '.join(BUDGETS)}")
        if REFERENCE not in self.methods:
            raise ValueError(f"the methods must include the reference {REFERENCE!r}")
        missing = [m for m in self.methods if m not in self.lr_grids]
        if missing:
            raise ValueError(f"no learning-rate grid for {', '.join(missing)}")
        tied = [m for m in self.methods if m in RATE_TIES]
        if tied:
            raise ValueError(f"{', '.join(tied)} take a rate from another optimizer's GLUE choice; not supported here")
        if self.seeds < 2 or not 1 <= self.frontier_seeds <= self.seeds:
            raise ValueError("seeds must be >= 2 (paired intervals) and 1 <= frontier_seeds <= seeds")

    def _compare(self) -> CompareConfig:
        return CompareConfig(tasks=[self.task1, self.task2], optimizers=self.methods, budget=self.budget,
                             seeds=self.seeds, model=self.model, data_dir=self.data_dir, out=self.out,
                             lr_grids=self.lr_grids, max_extensions=self.max_extensions, threads=self.threads,
                             overrides=self.overrides, rate_ties={})

    def checkpoint(self, method: str, lr1: float, seed: int) -> str:
        root = Path(self.checkpoints) if self.checkpoints else Path(self.out) / "checkpoints"
        return str(root / method / f"lr{lr1:g}-seed{seed}.pt")

    def task1_config(self, method: str, lr: float, seed: int) -> GlueRunConfig:
        """Exactly the GLUE comparison's run (so that its runs can be reused)."""
        return self._compare().run_config(self.task1, method, lr, seed)

    def saved_config(self, method: str, lr1: float, seed: int) -> GlueRunConfig:
        return replace(self.task1_config(method, lr1, seed), eval_points=0,
                       save_to=self.checkpoint(method, lr1, seed))

    def task2_config(self, method: str, lr1: float, lr: float, seed: int) -> GlueRunConfig:
        return replace(self._compare().run_config(self.task2, method, lr, seed), eval_points=self.task2_eval_points,
                       init_from=self.checkpoint(method, lr1, seed), watch_task=self.task1,
                       watch_train_limit=self.task1_config(method, lr1, seed).train_limit)


def _path(out: Path, stage: str, method: str, lr: float, seed: int) -> Path:
    return out / "runs" / stage / method / f"lr{lr:g}-seed{seed}.json"


def _task2_dir(out: Path, method: str, lr1: float) -> Path:
    """Task-2 runs of the models saved at task-1 rate ``lr1`` (another task-1 rate: other runs)."""
    return out / "runs" / "task2" / method / f"from-lr{lr1:g}"


def run(config: ContinualGlueConfig, execute=None, progress=None) -> dict:
    """Runs (or resumes) every stage; returns the summary (``summarize``) with the failures and the
    task-1 models rebuilt on the way."""
    out = Path(config.out)
    grids = config.lr_grids
    planned = sum(2 * len(grids[m]) + 2 * config.seeds + (len(grids[m]) - 1) * (config.frontier_seeds - 1)
                  for m in config.methods)
    ledger = RunLedger(planned, execute, progress)
    rebuilt: list[dict] = []
    saved_runs: dict[tuple[str, int], dict | None] = {}  # each task-1 model is ensured once per invocation

    def task1(method: str, lr: float) -> dict | None:
        run_config, path = config.task1_config(method, lr, 0), _path(out, "task1", method, lr, 0)
        reuse_run(Path(config.reuse) if config.reuse else None, run_config, path)
        return ledger.ensure(run_config, path)

    def task1_model(method: str, lr1: float, seed: int) -> dict | None:
        """The saved task-1 run of ``seed``; its model is rebuilt when its run file is on disk but the
        model is not (a fresh machine: models are not committed). A diverged run saved none."""
        if (method, seed) in saved_runs:
            return saved_runs[(method, seed)]
        run_config, path = config.saved_config(method, lr1, seed), _path(out, "task1-saved", method, lr1, seed)
        old = _load(path)
        if old is not None and old.get("saved_sha256") and not Path(run_config.save_to).exists():
            aside = path.with_name(path.name + ".old")
            path.replace(aside)  # put back if the rebuild fails, so the record is never lost
            new = ledger.ensure(run_config, path)
            if new is None:
                aside.replace(path)
            else:
                aside.unlink()
            rebuilt.append({"run": str(path.relative_to(out)), "old_sha256": old["saved_sha256"],
                            "new_sha256": new.get("saved_sha256") if new else None})
            saved_runs[(method, seed)] = new
        else:
            saved_runs[(method, seed)] = ledger.ensure(run_config, path)
        return saved_runs[(method, seed)]

    def task2(method: str, lr1: float, lr: float, seed: int) -> dict | None:
        run_config = config.task2_config(method, lr1, lr, seed)
        path = _task2_dir(out, method, lr1) / f"lr{lr:g}-seed{seed}.json"
        old = _load(path)
        outdated = old is not None and _lacks_refit(old, run_config)
        if old is None or outdated:
            saved = task1_model(method, lr1, seed)
            if saved is None or not saved.get("saved_sha256"):
                return old  # task 1 failed or diverged at this seed: nothing to continue from
        if outdated:  # made before the refit measures: run again, the old record kept until the new one is in
            aside = path.with_name(path.name + ".old")
            path.replace(aside)
            new = ledger.ensure(run_config, path)
            if new is None:
                aside.replace(path)
                return old
            aside.unlink()
            return new
        return ledger.ensure(run_config, path)

    # Seed 0 of every method first (its two searches: a one-seed frontier of each method), then each
    # further seed of every method. A job stopped part-way (a session's end) then leaves a frontier
    # for every method rather than five seeds of the first; each task-1 model still serves one
    # contiguous block of task-2 runs, so the order costs no extra rebuilds.
    searched: dict[str, tuple[float, list[float], float]] = {}
    for method in config.methods:
        _, lr1 = search_rate(lambda lr, m=method: task1(m, lr), grids[method], config.max_extensions)
        if lr1 is None:
            continue
        # Each seed's task-1 model is trained (or rebuilt) when a task-2 run first needs it.
        tried, lr2 = search_rate(lambda lr, m=method, r1=lr1: task2(m, r1, lr, 0), grids[method], config.max_extensions)
        searched[method] = (lr1, sorted(tried), lr2)
    for seed in range(1, config.seeds):
        for method, (lr1, tried, lr2) in searched.items():
            for lr in tried:
                if seed < config.frontier_seeds or lr == lr2:
                    task2(method, lr1, lr, seed)
    return {**summarize(config), "failures": ledger.failures, "rebuilt_models": rebuilt}


def _lacks_refit(run: dict, config: GlueRunConfig) -> bool:
    """A task-2 run file made before the refit measures (``glue.same_run`` counts it as this run,
    since the field it lacks takes its default, but its record has no ``watch.refit``)."""
    return bool(config.watch_refit_examples) and "refit" not in (run.get("watch") or {})


def _runs(folder: Path, seeds: int) -> list[dict]:
    """The run files in ``folder`` of seeds below ``seeds``."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return [r for r in runs if r["config"]["seed"] < seeds]


def _task2_record(run: dict) -> dict:
    # Task 1 before and after, both scored in this run: before = the model it started from (so that
    # forgetting compares one model with itself, even if the saved run on file was rebuilt since).
    # The refits (``refit``): the old head with its offset refit, and a linear probe refit on the body.
    watch = run.get("watch") or {}
    after = watch["validation"]["score"] if watch else None
    task1_before = watch["curve"][0]["score"] if watch else None
    refit = watch.get("refit")

    def refit_score(way: str, when: str) -> float | None:
        return refit[when][way]["validation"]["score"] if refit else None

    def drop(before: float | None, now: float | None) -> float | None:
        return before - now if before is not None and now is not None else None

    probe_before, probe_after = refit_score("probe", "before"), refit_score("probe", "after")
    return {"seed": run["config"]["seed"], "task2": run["validation"]["score"], "task2_heldout": run["score"],
            "task1_before": task1_before, "task1_after": after, "forgetting": drop(task1_before, after),
            "task1_before_offset": refit_score("offset", "before"),
            "task1_after_offset": refit_score("offset", "after"),
            "task1_before_probe": probe_before, "task1_after_probe": probe_after,
            "forgetting_probe": drop(probe_before, probe_after),
            "retention": run.get("retention"), "diverged": bool(run["metrics"].get("diverged"))}


# Task 1 after task 2, three ways (``refit``): with its own head (the paper's measure), with that
# head's offset refit, with a linear probe refit on the body's features.
TASK1_AFTER = ("task1_after", "task1_after_offset", "task1_after_probe")
REFIT_KEYS = ("task1_after_offset", "task1_after_probe", "forgetting_probe")


def _mean_of_all(values) -> float | None:
    values = list(values)
    return None if not values or None in values else sum(values) / len(values)


def summarize(config: ContinualGlueConfig) -> dict:
    """Reads the run files under ``config.out`` into per-method frontiers and the paired comparison."""
    out = Path(config.out)
    methods: dict[str, dict] = {}
    saved_finals: dict[str, dict] = {}  # for the gates: the saved task-1 runs, and the task-2 runs at
    finals: dict[str, dict] = {}        # the chosen task-2 rate
    for method in config.methods:
        tuning1 = {r["config"]["lr"]: r for r in _runs(out / "runs" / "task1" / method, 1)}
        lr1 = chosen_rate(tuning1, config.lr_grids[method], config.max_extensions)
        if lr1 is None:
            continue  # the task-1 search has not settled yet (or every run failed)
        saved = {r["config"]["seed"]: r for r in _runs(out / "runs" / "task1-saved" / method, config.seeds)
                 if r["config"]["lr"] == lr1}
        saved_finals[method] = {"_finals": [saved[s] for s in sorted(saved)]}
        # Only runs that continue this task-1 rate's models (an earlier choice's runs are in another folder).
        runs2 = _runs(_task2_dir(out, method, lr1), config.seeds)
        by_rate: dict[float, list[dict]] = {}
        for r in runs2:
            by_rate.setdefault(r["config"]["lr"], []).append(_task2_record(r))
        tuning2 = {r["config"]["lr"]: r for r in runs2 if r["config"]["seed"] == 0}
        settled = bool(tuning2) and next_rate(tuning2, config.lr_grids[method], config.max_extensions) is None
        lr2 = chosen_rate(tuning2, config.lr_grids[method], config.max_extensions)
        frontier = []
        for lr in sorted(by_rate):
            records = sorted((x for x in by_rate[lr] if x["seed"] < config.frontier_seeds), key=lambda x: x["seed"])
            frontier.append({"lr": lr, "seeds": [x["seed"] for x in records],
                             **{f"mean_{k}": _mean_or_none(x[k] for x in records)
                                for k in ("task2", "task1_after", "retention", "forgetting")},
                             # a refit's mean only over every seed of the point, so that it pairs with
                             # the task-2 mean (a folder with older run files lacks some)
                             **{f"mean_{k}": _mean_of_all(x[k] for x in records) for k in REFIT_KEYS},
                             "per_seed": {k: [x[k] for x in records] for k in ("task2", *TASK1_AFTER, "retention")},
                             "diverged": sum(x["diverged"] for x in records)})
        tuned = sorted(by_rate.get(lr2, []), key=lambda x: x["seed"]) if lr2 is not None else []
        finals[method] = {"_finals": sorted((r for r in runs2 if r["config"]["lr"] == lr2),
                                            key=lambda r: r["config"]["seed"])}
        methods[method] = {
            "lr_task1": lr1, "task1_grid": [{"lr": lr, "heldout": r["score"], "validation": r["validation"]["score"]}
                                            for lr, r in sorted(tuning1.items())],
            "task1_before": [saved[s]["validation"]["score"] for s in sorted(saved)],
            "lr_task2": lr2, "task2_settled": settled, "task2_tried": sorted(tuning2),
            "task2_at_edge": lr2 is not None and lr2 in (min(tuning2), max(tuning2)),
            "frontier": frontier, "tuned": tuned,
            # task-2 runs that started from another model than the saved task-1 run on file (a rebuilt one)
            "init_mismatches": [f"lr{r['config']['lr']:g}-seed{r['config']['seed']}" for r in runs2
                                if r.get("init_sha256") != saved.get(r["config"]["seed"], {}).get("saved_sha256")],
            "curve_file": (str((_task2_dir(out, method, lr1) / f"lr{lr2:g}-seed0.json").relative_to(out))
                           if lr2 is not None else None),
        }
    # Both tasks must learn (DESIGN.md section 5): AdamW against the trivial predictor and the
    # head-only control on each task's held-out slice, as the GLUE comparison's gate.
    gates = {"task1": gate(config.task1, saved_finals, config.seeds), "task2": gate(config.task2, finals, config.seeds)}
    return {"config": asdict(config), "gates": gates, "methods": methods,
            "comparisons": compare_methods(methods)}


def _paired(cell: list[dict], reference: list[dict], key: str) -> dict:
    theirs = {x["seed"]: x[key] for x in reference}
    return judged_difference([x[key] - theirs[x["seed"]] for x in cell
                              if x[key] is not None and theirs.get(x["seed"]) is not None])


def compare_methods(methods: dict[str, dict]) -> dict[str, dict]:
    """Each method against AdamW at the chosen task-2 rates: paired per-seed differences, and
    retention at equal task-2 score (task 1 after, and the probe) against AdamW's frontier."""
    ref = methods.get(REFERENCE)
    if ref is None or not ref["tuned"]:
        return {}
    rows = {}
    for method, m in methods.items():
        if method == REFERENCE or not m["tuned"]:
            continue
        row = {key: _paired(m["tuned"], ref["tuned"], key)
               for key in ("task2", *TASK1_AFTER, "forgetting", "forgetting_probe", "retention")}
        cell = {"scores": [x["task2"] for x in m["tuned"]]}
        for key in (*TASK1_AFTER, "retention"):
            reference = {"grid": [{"validation": p["mean_task2"], "retention": p[f"mean_{key}"]}
                                  for p in ref["frontier"] if None not in (p["mean_task2"], p[f"mean_{key}"])]}
            equal = retention_at_equal_score({**cell, "retention": [x[key] for x in m["tuned"]]}, reference)
            equal.pop("front")
            row[f"{key}_at_equal_task2"] = equal
        row["frontier_dominance"] = {f"{p['lr']:g}": _dominance(p, ref["frontier"]) for p in m["frontier"]}
        # None where no probe was measured (older run files), so that it reads apart from "dominates nothing"
        row["frontier_dominance_probe"] = {f"{p['lr']:g}": _dominance(p, ref["frontier"], "task1_after_probe")
                                           if p["mean_task1_after_probe"] is not None else None
                                           for p in m["frontier"]}
        rows[method] = row
    return rows


def _dominance(point: dict, reference: list[dict], task1: str = "task1_after") -> dict:
    """``analysis.frontier.paired_dominance`` of one frontier point against AdamW's points
    (task 2 and ``task1``, one of ``TASK1_AFTER``), each pair over the seeds both ran with a value."""
    def axes(p: dict, seeds: list[int]) -> dict[str, list]:
        by_seed = dict(zip(p["seeds"], zip(p["per_seed"]["task2"], p["per_seed"][task1])))
        return {"score": [by_seed[s][0] for s in seeds], "retention": [by_seed[s][1] for s in seeds]}

    def valued(p: dict) -> set[int]:
        return {s for s, v in zip(p["seeds"], p["per_seed"][task1]) if v is not None}

    found = {"dominated_by": [], "dominates": []}
    for ref in reference:
        common = sorted(valued(point) & valued(ref))
        # one pair at a time (each over its own common seeds), widened over all of AdamW's points
        pair = paired_dominance(axes(point, common), {f"{ref['lr']:g}": axes(ref, common)},
                                level=1 - 0.05 / max(1, len(reference)))
        found["dominated_by"] += pair["dominated_by"]
        found["dominates"] += pair["dominates"]
    return found


# -- rendering ---------------------------------------------------------------------------------

def render(result: dict, out_dir: str) -> list[Path]:
    """``continual_glue.md`` (rates, the tuned table, the paired comparison, the frontier points,
    rebuilt models) and ``continual_glue_frontier.png`` / ``continual_glue_curves.png``."""
    cfg, methods = result["config"], result["methods"]
    t1, t2 = cfg["task1"].upper(), cfg["task2"].upper()
    rows = [[name, f"{m['lr_task1']:g}", f"{m['lr_task2']:g}" + (" (edge)" if m["task2_at_edge"] else "")
             if m["lr_task2"] is not None else "searching", percent_mean_std(m["task1_before"]),
             *(percent_mean_std(x[key] for x in m["tuned"])
               for key in ("task2", *TASK1_AFTER, "forgetting", "task1_before_probe", "forgetting_probe",
                           "retention")),
             len(m["tuned"])]
            for name, m in methods.items()]
    comp = [[name, *(percent_interval(r[key]) for key in ("task2", *TASK1_AFTER, "forgetting", "forgetting_probe",
                                                          "retention"))]
            for name, r in result["comparisons"].items()]
    equal = [[name, *(percent_interval(r[f"{key}_at_equal_task2"]) + _outside(r[f"{key}_at_equal_task2"])
                      for key in (*TASK1_AFTER, "retention"))]
             for name, r in result["comparisons"].items()]
    points = [[name, f"{p['lr']:g}", len(p["seeds"]), percent(p["mean_task2"]),
               *(percent(p.get(f"mean_{key}")) for key in TASK1_AFTER), percent(p["mean_retention"]),
               p["diverged"] or ""]
              for name, m in methods.items() for p in m["frontier"]]
    ways = [f"{t1} after", f"{t1} after (offset refit)", f"{t1} after (probe)"]
    sections = [f"Task 1 {t1}, then task 2 {t2} from each method's own task-1 model; scores x 100 on the validation "
                f"sets (task 1 with its own head reloaded), rates chosen on held-out slices of the training sets; "
                f"STS = the zero-shot STS-B Spearman probe of the backbone. Budget `{cfg['budget']}`.", "",
                f"{t1} (task 1) {gate_line(cfg['task1'], result['gates']['task1'])}.  ",
                f"{t2} (task 2) {gate_line(cfg['task2'], result['gates']['task2'])}.", "",
                f"{t1} after {t2}, three ways (`nanoadam_lab.experiments.refit`): with its own head reloaded (the "
                f"paper's measure); with that head's offset refit on {t1} training examples (its weights kept); with "
                f"a linear probe refit on the body's features. Task 2 moves the features as a whole to fit its own "
                f"new head, which shifts every old logit alike: the old head then predicts one class while the "
                f"classes can stay as separable as before. The refits tell the two apart.", "",
                "## At the chosen rates", "",
                f"Forgetting: {t1} before task 2 minus after, both with its own head (before: the saved task-1 "
                f"model's score, measured again in the task-2 run); with the probe, the probe refit before task 2 "
                f"minus the probe refit after.", "",
                ex.markdown_table(["method", f"{t1} rate", f"{t2} rate", f"{t1} before", t2, *ways,
                                   "forgetting", f"{t1} before (probe)", "forgetting (probe)", "STS", "seeds"],
                                  rows), "",
                "## Against AdamW, paired by seed", "",
                "Difference [95 % interval] and the verdict it supports. At equal task-2 score: the method's per-seed "
                "value minus AdamW's frontier (its per-rate means) at the same task-2 score; seeds outside that "
                "frontier's range are counted and left out.", "",
                ex.markdown_table(["method", t2, *ways, "forgetting", "forgetting (probe)", "STS"], comp), "",
                ex.markdown_table(["method", *(f"{w} at equal {t2}" for w in ways), f"STS at equal {t2}"], equal), "",
                f"## Frontier points (mean over seeds below {cfg['frontier_seeds']})", "",
                ex.markdown_table(["method", f"{t2} rate", "seeds", t2, *ways, "STS", "diverged"], points), "",
                f"Each frontier point against each of AdamW's, paired by seed on {t2} and {t1} after at once (95 % "
                "intervals, Bonferroni-widened over AdamW's points): the AdamW rates that beat it on both, and those "
                f"it beats on both; {t1} after with its own head, then with the probe.", "",
                ex.markdown_table(["method", f"{t2} rate", "beaten on both by AdamW at", "beats AdamW at",
                                   "probe: beaten by AdamW at", "probe: beats AdamW at"],
                                  [[name, lr, *(_dominance_cell(d, k) for d in (r["frontier_dominance"][lr],
                                                                               r["frontier_dominance_probe"][lr])
                                                for k in ("dominated_by", "dominates"))]
                                   for name, r in result["comparisons"].items()
                                   for lr in r["frontier_dominance"]]), ""]
    mismatched = {name: m["init_mismatches"] for name, m in methods.items() if m["init_mismatches"]}
    if mismatched or result.get("rebuilt_models"):
        sections += ["## Rebuilt task-1 models", "", "Task-1 models rebuilt because their file was missing: "
                     f"{json.dumps(result.get('rebuilt_models', []))}. Task-2 runs whose starting model's fingerprint "
                     f"differs from the task-1 run now on file: {json.dumps(mismatched)}.", ""]
    figures = [plot_frontier(result, Path(out_dir) / "continual_glue_frontier.png"),
               plot_watch_curves(result, Path(out_dir), Path(out_dir) / "continual_glue_curves.png")]
    sections += [f"![{f.stem}]({f.name})" for f in figures if f is not None] + ["", "## Settings", "",
                                                                                ex.settings_table(cfg)]
    title = f"Language continual finetuning: {t1} then {t2}"
    return [*(f for f in figures if f is not None), ex.write_markdown(out_dir, "continual_glue", title, result,
                                                                      sections)]


def _dominance_cell(found: dict | None, key: str) -> str:
    return "not measured" if found is None else ", ".join(found[key]) or "-"


def _outside(d: dict) -> str:
    outside = [f"{d[k]} {k.split('_')[1]}" for k in ("seeds_above_front", "seeds_below_front") if d[k]]
    return f" ({', '.join(outside)})" if outside else ""


def plot_frontier(result: dict, path: Path) -> Path:
    """Task 1 after task 2 with its own head (left), with a linear probe refit (middle), and the STS
    probe (right), against task-2 score, one line per method."""
    plt = ex.pyplot()
    cfg = result["config"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for name, m in result["methods"].items():
        pts = [p for p in m["frontier"] if p["mean_task2"] is not None]
        for ax, key in zip(axes, ("mean_task1_after", "mean_task1_after_probe", "mean_retention")):
            xy = [(100 * p["mean_task2"], 100 * p[key], p["lr"]) for p in pts if p.get(key) is not None]
            if not xy:
                continue
            (line,) = ax.plot([x for x, _, _ in xy], [y for _, y, _ in xy], marker="o", label=name)
            for x, y, lr in xy:
                ax.annotate(f"{lr:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7,
                            color=line.get_color())
    axes[0].set(xlabel=f"{cfg['task2']} validation score x100", ylabel=f"{cfg['task1']} after, own head, x100")
    axes[1].set(xlabel=f"{cfg['task2']} validation score x100",
                ylabel=f"{cfg['task1']} after, linear probe refit, x100")
    axes[2].set(xlabel=f"{cfg['task2']} validation score x100", ylabel="zero-shot STS-B Spearman x100")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"One point per task-2 learning rate (mean of the seeds below {cfg['frontier_seeds']})", fontsize=10)
    fig.tight_layout()
    return ex.save_figure(fig, path, dpi=120)


def plot_watch_curves(result: dict, out: Path, path: Path) -> Path | None:
    """Task 1's validation score during task 2 (seed 0 at each method's chosen task-2 rate)."""
    plt = ex.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    drawn = False
    for name, m in result["methods"].items():
        run = _load(out / m["curve_file"]) if m["curve_file"] else None
        if run is None or not run.get("watch"):
            continue
        curve = run["watch"]["curve"]
        ax.plot([p["step"] for p in curve], [100 * p["score"] for p in curve], marker="o",
                label=f"{name} (lr {run['config']['lr']:g})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    cfg = result["config"]
    ax.set(xlabel=f"{cfg['task2']} training step", ylabel=f"{cfg['task1']} validation score x100 (own head)",
           title=f"{cfg['task1']} during {cfg['task2']} (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return ex.save_figure(fig, path, dpi=120)


def main(config: ContinualGlueConfig, command: str | None = None, execute=None, progress=None,
         render_only: bool = False) -> dict:
    """Runs (or resumes) the experiment (or, ``render_only``, only reads what is finished), writes
    ``continual_glue.json`` to ``config.out`` and renders from it."""
    body = ({**summarize(config), "failures": [], "rebuilt_models": []} if render_only
            else run(config, execute, progress))
    result = {"command": command, "machine": ex.machine_info(), **body}
    ex.write_result(config.out, "continual_glue", result)
    render(ex.read_result(config.out, "continual_glue"), config.out)
    return result
