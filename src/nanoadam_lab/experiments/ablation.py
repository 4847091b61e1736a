"""``nanoadam reproduce ablation``: which weights to update, on SST-2 with MiniLM (paper Sec. 3.2).

Every variant is NanoAdam (or LIFT's selection, which is NanoAdam's ``principal_weights``) at
the same density, with the GLUE comparison's recipe, budget, held-out slice and batch order
(:mod:`nanoadam_lab.experiments.compare`); they differ only in what is named below:

* selection (Fig. 4a): small, random and large weights, each at its own rate (a selection that
  moves other weights may want another rate), and random minus large weights paired as well;
* small weights vs large gradients (Fig. 4b): each at its own rate, and large gradients at small
  weights' rate as well; LIFT's principal weights at their own rate;
* dynamic vs static mask (Table 14, Fig. 11) and the mask interval (Table 11) at small weights'
  rate (the same selection, refreshed differently; the main runs refresh every 50 steps);
* the density at its own rate (the main runs: 0.1), and the paper's linear density decay (Sec. 3,
  Algorithm 1: from 0.1 to a final density over the run, changing at the mask refreshes) at small
  weights' rate. The paper's density-interval study (its Table 12) needs far more steps than the
  214 here, where an interval past 50 changes the density at most four times.

Rates ("own"): seed 0 over the grid, scored on the held-out slice of the training data, a best
rate on an edge extends the grid, ties go to the lower held-out loss (``compare.best_lr``).
Then every variant runs ``seeds`` seeds at its rate; each is compared with small weights by the
per-seed differences of validation score (and of the zero-shot retention probe) with a 95 %
t-interval, and the verdict follows the interval. ``reuse``: a comparison's folder whose
identical runs (small weights = its ``nanoadam``, principal weights = its ``lift``) are copied
instead of run again.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import experiment as ex
from ..baselines.registry import REGISTRY
from ..experiment import percent_interval
from .compare import (
    BUDGET_OPTIMIZER_OVERRIDES,
    LR_GRIDS,
    RunLedger,
    _grid_row,
    _load,
    _paired,
    budget_settings,
    reuse_run,
    search_rate,
)
from .glue import GlueRunConfig

REFERENCE = "small_weights"


def variants(intervals: list[int], densities: list[float],
             decays: list[float] = ()) -> dict[str, tuple[str, dict[str, Any], str]]:
    """name -> (registry optimizer, overrides, rate: "own" or the variant whose rate it takes)."""
    out = {
        "small_weights": ("nanoadam", {}, "own"),
        "random_weights": ("nanoadam", {"selection": "random"}, "own"),
        "large_weights": ("nanoadam", {"selection": "large_weights"}, "own"),
        "large_gradients": ("nanoadam", {"selection": "large_gradients"}, "own"),
        "large_gradients_at_small_weights_rate": ("nanoadam", {"selection": "large_gradients"}, REFERENCE),
        "principal_weights": ("lift", {}, "own"),
        "static_mask": ("nanoadam-static", {}, REFERENCE),
    }
    out.update({f"interval_{m}": ("nanoadam", {"mask_interval": m}, REFERENCE) for m in intervals})
    out.update({f"density_{d:g}": ("nanoadam", {"density": d}, "own") for d in densities})
    out.update({f"decay_to_{d:g}": ("nanoadam", {"final_density": d}, REFERENCE) for d in decays})
    return out


@dataclass
class AblationConfig:
    task: str = "sst2"
    model: str = "minilm"
    data_dir: str | None = None
    out: str = "results/ablation"
    budget: str = "standard"
    seeds: int = 5
    threads: int = 2
    max_extensions: int = 3
    lr_grids: dict[str, list[float]] = field(default_factory=lambda: {"nanoadam": list(LR_GRIDS["nanoadam"]),
                                                                       "lift": list(LR_GRIDS["lift"])})
    intervals: list[int] = field(default_factory=lambda: [10, 200])  # the main runs refresh every 50
    densities: list[float] = field(default_factory=lambda: [0.01, 0.3])  # the main runs: 0.1
    decays: list[float] = field(default_factory=lambda: [0.01])  # final densities of the density decay
    overrides: dict[str, Any] = field(default_factory=dict)  # budget settings to override (tests)
    reuse: str | None = None
    only: list[str] | None = None  # a subset of the variants (small weights, the reference, always runs)

    def __post_init__(self):
        if self.seeds < 2:
            raise ValueError("the ablation compares paired seeds: seeds must be >= 2")
        known = self.all_variants()
        if self.only is not None and (set(self.only) - set(known) or REFERENCE not in self.only):
            raise ValueError(f"only= takes variants among {', '.join(known)}, {REFERENCE} included")

    def all_variants(self) -> dict[str, tuple[str, dict[str, Any], str]]:
        """Every variant these intervals, densities and decays define (``only`` not applied)."""
        return variants(self.intervals, self.densities, self.decays)

    def variants(self) -> dict[str, tuple[str, dict[str, Any], str]]:
        return {k: v for k, v in self.all_variants().items() if self.only is None or k in self.only}

    def run_config(self, name: str, lr: float, seed: int) -> GlueRunConfig:
        optimizer, overrides, _ = self.all_variants()[name]
        settings = {**budget_settings(self.budget, self.task), **self.overrides}
        if seed != 0:
            settings["eval_points"] = 0
        overrides = {**BUDGET_OPTIMIZER_OVERRIDES[self.budget].get(optimizer, {}), **overrides}
        return GlueRunConfig(task=self.task, optimizer=optimizer, lr=lr, seed=seed, model=self.model,
                             data_dir=self.data_dir, threads=self.threads, eval_split="heldout",
                             optimizer_overrides=overrides, **settings)


class _Unfinished(Exception):
    """A run that a render-only summary needs is not on disk yet."""


def run(config: AblationConfig, execute=None, progress=None, render_only: bool = False) -> dict:
    """Runs (or resumes) every variant; ``render_only``: runs nothing and summarizes the finished
    run files (a search with a run still missing is reported as searching, finals as far as done)."""
    out = Path(config.out)
    table = config.variants()
    own = [name for name, (_, _, rate) in table.items() if rate == "own"]
    planned = sum(len(config.lr_grids[table[n][0]]) for n in own) + len(table) * config.seeds - len(own)
    ledger = RunLedger(planned, execute, progress)

    def ensure(name: str, lr: float, seed: int) -> dict | None:
        run_cfg = config.run_config(name, lr, seed)
        path = out / "runs" / name / f"lr{lr:g}-seed{seed}.json"
        if render_only:
            if (found := _load(path)) is None:
                raise _Unfinished(path)
            return found
        reuse_run(Path(config.reuse) if config.reuse else None, run_cfg, path)
        return ledger.ensure(run_cfg, path)

    def finished(name: str, lr: float, seed: int) -> dict | None:
        try:
            return ensure(name, lr, seed)
        except _Unfinished:
            return None

    chosen: dict[str, float | None] = {}
    searches: dict[str, dict[float, dict]] = {}
    searching: dict[str, list[dict]] = {}  # render-only: the variants whose search has a run still to do
    for name in own:
        seen: dict[float, dict] = {}

        def search_run(lr: float, n: str = name, seen: dict = seen) -> dict | None:
            seen[lr] = ensure(n, lr, 0)
            return seen[lr]
        try:
            searches[name], chosen[name] = search_rate(search_run, config.lr_grids[table[name][0]],
                                                       config.max_extensions)
        except _Unfinished:
            chosen[name] = None
            searching[name] = [_grid_row(seen[x]) for x in sorted(seen) if seen[x] and "config" in seen[x]]
    for name, (_, _, rate) in table.items():
        if rate != "own":
            chosen[name] = chosen.get(rate)
    cells = {}
    for name in table:
        lr = chosen[name]
        if lr is None:
            continue
        finals = [r for seed in range(config.seeds)
                  if (r := finished(name, lr, seed)) is not None and "validation" in r]
        if not finals:
            continue
        cells[name] = {
            "lr": lr, "rate_from": table[name][2], "optimizer": table[name][0], "overrides": table[name][1],
            "seeds": [r["config"]["seed"] for r in finals], "scores": [r["validation"]["score"] for r in finals],
            "retention": [r.get("retention") for r in finals],
            "mean": statistics.fmean(r["validation"]["score"] for r in finals),
            "std": statistics.stdev([r["validation"]["score"] for r in finals]) if len(finals) > 1 else 0.0,
            "diverged": sum(bool(r["metrics"].get("diverged")) for r in finals),
            "untouched_fraction": statistics.fmean(r["untouched_fraction"] for r in finals),
            "l2_shift": statistics.fmean(r["l2_shift"] for r in finals),
            "run_files": [f"runs/{name}/lr{lr:g}-seed{r['config']['seed']}.json" for r in finals],
        }
        if name in searches:
            cells[name]["grid"] = [_grid_row(searches[name][x]) for x in sorted(searches[name])
                                   if "config" in searches[name][x]]
    if REFERENCE in cells:
        for name, cell in cells.items():
            if name != REFERENCE:
                cell["vs_small_weights"] = {"score": _paired(cell, cells[REFERENCE], "scores"),
                                            "retention": _paired(cell, cells[REFERENCE], "retention")}
    extra = {}
    if {"random_weights", "large_weights"} <= set(cells):  # Fig. 4a's order: small > random > large
        extra["random_minus_large"] = {"score": _paired(cells["random_weights"], cells["large_weights"], "scores")}
    return {"config": asdict(config), "cells": cells, **extra, "searching": searching, "failures": ledger.failures}


def reference_setting(budget: str, key: str) -> Any:
    """Small weights' (NanoAdam's) ``key`` in ``budget``: the budget's override, else the registry's default."""
    nanoadam = BUDGET_OPTIMIZER_OVERRIDES[budget].get("nanoadam", {})
    return nanoadam.get(key, REGISTRY["nanoadam"].defaults[key])


def render(result: dict, out_dir: str) -> list[Path]:
    """``ablation.md`` (a table per study with paired intervals against small weights, the rate
    searches, the settings) and ``ablation_curves.png``, from the result and its run files."""
    c, cells = result["config"], result["cells"]
    every, density = (reference_setting(c["budget"], key) for key in ("mask_interval", "density"))

    def row(name, label):
        if name not in cells:
            return [label, *["-"] * 6]
        x = cells[name]
        vs = x.get("vs_small_weights", {})
        flag = f" ({x['diverged']} diverged)" if x["diverged"] else ""
        return [label, f"{x['lr']:g}" + (" (own)" if x["rate_from"] == "own" else " (small weights')"),
                f"{100 * x['mean']:.2f} ± {100 * x['std']:.2f}{flag} (n={len(x['scores'])})",
                percent_interval(vs.get("score")), percent_interval(vs.get("retention")),
                f"{100 * x['untouched_fraction']:.1f} %", f"{x['l2_shift']:.3f}"]

    head = ["variant", "rate", "validation score (x100)", "minus small weights [95 % CI]",
            "retention minus small weights [95 % CI]", "untouched", "L2 shift"]
    studies = [
        ("Small vs random vs large weights (Fig. 4a), each at its own rate",
         [row("small_weights", "small weights"), row("random_weights", "random weights"),
          row("large_weights", "large weights")]),
        ("Small weights vs large gradients (Fig. 4b) and LIFT's principal weights",
         [row("small_weights", "small weights"), row("large_gradients", "large gradients"),
          row("large_gradients_at_small_weights_rate", "large gradients at small weights' rate"),
          row("principal_weights", "principal weights (LIFT)")]),
        ("Dynamic vs static mask (Table 14, Fig. 11)",
         [row("small_weights", f"dynamic (every {every} steps)"), row("static_mask", "static")]),
        ("Mask interval (Table 11), density and its decay",
         [row("small_weights", f"small weights: refresh every {every} steps, density {density:g}"),
          *(row(f"interval_{m}", f"refresh every {m} steps") for m in c["intervals"]),
          *(row(f"density_{d:g}", f"density {d:g}") for d in c["densities"]),
          *(row(f"decay_to_{d:g}", f"density decay {density:g} to {d:g}") for d in c.get("decays", []))]),
    ]
    sections = ["Verdicts: `higher`/`lower` only where the 95 % interval of the paired per-seed differences "
                "excludes zero.", ""]
    if "random_minus_large" in result:
        difference = percent_interval(result["random_minus_large"]["score"])
        sections += [f"Random minus large weights, paired by seed: {difference}.", ""]
    for title, rows in studies:
        sections += [f"## {title}", "", ex.markdown_table(head, rows), ""]
    searches = [[name, ", ".join(f"{g['lr']:g}: {100 * g['heldout']:.2f} (loss {g['heldout_loss']:.3f})"
                                 for g in cell["grid"]), f"{cell['lr']:g}"]
                for name, cell in cells.items() if "grid" in cell]
    searches += [[name, ", ".join(f"{g['lr']:g}: {100 * g['heldout']:.2f} (loss {g['heldout_loss']:.3f})"
                                  for g in grid) or "no run finished", "searching"]
                 for name, grid in result.get("searching", {}).items()]
    sections += ["## Rate searches (seed 0, held-out slice)", "",
                 ex.markdown_table(["variant", "held-out score per rate", "chosen"], searches), ""]
    figure = plot(result, Path(out_dir))
    sections += [f"![curves]({figure.name})", "", "## Settings", "", ex.settings_table(c)]
    title = f"Ablation on {c['task'].upper()} (paper Fig. 4a, 4b, 11, Tables 11 and 14)"
    return [figure, ex.write_markdown(out_dir, "ablation", title, result, sections)]


def main(config: AblationConfig, command: str | None = None, execute=None, progress=None,
         render_only: bool = False) -> dict:
    """Runs (or resumes) the ablation (``render_only``: only reads what is finished), writes
    ``ablation.json`` to ``config.out`` and renders from it."""
    result = {"command": command, "machine": ex.machine_info(), **run(config, execute, progress, render_only)}
    ex.write_result(config.out, "ablation", result)
    render(ex.read_result(config.out, "ablation"), config.out)
    return result


def plot(result: dict, out: Path) -> Path:
    plt = ex.pyplot()

    panels = [("Fig. 4a: which weights", ["small_weights", "random_weights", "large_weights"]),
              ("Fig. 4b: small weights vs large gradients", ["small_weights", "large_gradients",
                                                            "large_gradients_at_small_weights_rate",
                                                            "principal_weights"]),
              ("Table 14, Fig. 11: dynamic vs static", ["small_weights", "static_mask"])]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for col, (title, names) in enumerate(panels):
        for name in names:
            if name not in result["cells"]:
                continue
            run = json.loads((out / result["cells"][name]["run_files"][0]).read_text())
            losses = run["loss_curve"]
            w = max(1, len(losses) // 15)
            smooth = [sum(losses[max(0, i - w + 1): i + 1]) / len(losses[max(0, i - w + 1): i + 1])
                      for i in range(len(losses))]
            axes[0, col].plot(range(1, len(losses) + 1), smooth, label=name)
            axes[1, col].plot([p["step"] for p in run["eval_curve"]], [100 * p["score"] for p in run["eval_curve"]],
                              marker="o", label=name)
        axes[0, col].set(title=title, xlabel="step", ylabel="training loss (moving average)")
        axes[1, col].set(xlabel="step", ylabel="validation score (x100)")
        axes[0, col].legend(fontsize=8)
        axes[1, col].legend(fontsize=8)
    fig.tight_layout()
    return ex.save_figure(fig, out / "ablation_curves.png")
