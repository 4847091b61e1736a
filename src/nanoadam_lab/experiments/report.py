"""Tables and figures of a comparison, rendered from its summary and run files on disk (never
recomputed, never interpreted: what a table means is written by a person in the results' README)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import experiment as ex
from ..experiment import percent, percent_interval
from .glue_data import TASKS

METRIC_NAMES = {"accuracy": "acc", "matthews": "MCC", "pearson": "Pearson"}


def _equal_score(d: dict | None) -> str:
    if not d:
        return "-"
    outside = [f"{d[k]} {k.split('_')[1]}" for k in ("seeds_above_front", "seeds_below_front") if d[k]]
    return percent_interval(d) + (f" ({', '.join(outside)} AdamW's front)" if outside else "")


def _step_time(cell: dict) -> str:
    """Timed in turn (``nanoadam bench glue``) with its ratio when there is such a time, else the
    run files' median, marked."""
    timed = cell.get("timed_in_turn")
    if timed:
        return f"{timed['median_step_s']:.3f} ({timed['ratio']:.2f}x)"
    return f"{cell['median_step_s']:.3f}*" if cell.get("median_step_s") is not None else "-"


def _step_note(cells: dict) -> str:
    timed = [c["timed_in_turn"] for c in cells.values() if c.get("timed_in_turn")]
    note = []
    if timed:
        note.append(f"step (s): median whole training step with the optimizers taking turns on one machine, "
                    f"and its ratio to {timed[0]['reference']} (`nanoadam bench glue`, `steps.md`: each "
                    "ratio's range over blocks, the machine and how busy it was; mask refreshes, every 50 steps, "
                    "are outside the medians)")
    if len(timed) < len(cells):
        note.append("*: the mean over seeds of each run file's median step, timed next to other jobs and on "
                    "different days: not a speed comparison")
    return "; ".join(note) + "."


def gate_line(task: str, gate: dict) -> str:
    if gate.get("passed") is None:
        return f"gate: undecided ({gate.get('reason')})"
    parts = [f"{name.replace('vs_', 'vs. ').replace('_', '-')} {100 * gate[name]['difference']:+.2f} "
             f"(SE {100 * gate[name]['se']:.2f})" for name in ("vs_trivial", "vs_head_only") if name in gate]
    return f"gate ({'passed' if gate['passed'] else 'FAILED'}): AdamW on the held-out slice " + ", ".join(parts)


def glue_table(summary: dict) -> str:
    """Per task: each optimizer's validation score (x 100, mean and std over seeds), its paired
    difference against AdamW with the 95 % interval, its retention (zero-shot STS-B Spearman x 100)
    and that difference, the chosen rate, parameter shift and step time; the task's gate; then
    the average over the tasks that pass the gate."""
    config = summary["config"]
    lines = [f"Budget: {summary['budget_note']}. Pretrained retention (zero-shot STS-B Spearman x 100): "
             f"{percent(summary.get('pretrained_retention'))}.", ""]
    for task in config["tasks"]:
        entry = summary["tasks"].get(task, {"cells": {}, "gate": {"passed": None, "reason": "no runs"}})
        cells = entry["cells"]
        metric = METRIC_NAMES[TASKS[task].metric]
        probe = "" if task != "stsb" else " (STS-B is the task here: the probe is not held out)"
        lines += [f"### {task.upper()} ({metric})", "", gate_line(task, entry["gate"]) + probe, "",
                  "| optimizer | lr | score | vs. AdamW [95 % CI] | retention | vs. AdamW [95 % CI] | "
                  "vs. AdamW at equal score [95 % CI] | seeds | untouched | L2 shift | step (s) |", "|" + "---|" * 11]
        for opt in config["optimizers"]:
            c = cells.get(opt)
            if c is None:
                done = entry.get("searching", {}).get(opt, [])
                runs = "; ".join(f"{r['lr']:g}: held-out {percent(r['heldout'])}, validation "
                                 f"{percent(r['validation'])}, retention {percent(r['retention'])}" for r in done)
                lines.append(f"| {opt} | searching ({runs or 'no run finished'}) |" + " |" * 9)
                continue
            vs = c.get("vs_adamw", {})
            lr = f"{c['lr']:g}" + (" (edge)" if c["at_edge"] else "")
            lines.append(
                f"| {opt} | {lr} | {percent(c['mean'])} ± {percent(c['std'])} | {percent_interval(vs.get('score'))} | "
                f"{percent(c['retention_mean'])} | {percent_interval(vs.get('retention'))} | "
                f"{_equal_score(vs.get('retention_at_equal_score'))} | {len(c['seeds'])} | "
                f"{percent(c['untouched_fraction'])} % | {c['l2_shift']:.3f} | {_step_time(c)} |")
        lines += ["", *([_step_note(cells), ""] if cells else []), "Held-out score per rate (seed 0): " + "; ".join(
            f"{opt} " + ", ".join(f"{row['lr']:g}: {percent(row['heldout'])}" for row in c["grid"])
            for opt, c in cells.items()), ""]
    avg = summary["average"]
    lines += ["### Average over the tasks that pass the gate", "",
              f"Tasks: {', '.join(avg['tasks']) or 'none yet'}."]
    for task, reason in avg["excluded"].items():
        lines.append(f"Left out: {task} ({reason}).")
    if avg["optimizers"]:
        lines += ["", "| optimizer | average | vs. AdamW [95 % CI] | seeds |", "|---|---|---|---|"]
        for opt, row in avg["optimizers"].items():
            lines.append(f"| {opt} | {percent(row['mean'])} | {percent_interval(row.get('vs_adamw'))} | "
                         f"{len(row['seeds'])} |")
    lines += ["", f"{summary['finished_runs']} finished runs; their training loops took "
              f"{summary['train_seconds_total'] / 3600:.2f} h in all (loading, evaluation and probe not included)."]
    if summary.get("retimed"):
        lines += ["", "Reran for timing (median step time and score, first run -> rerun):", ""]
        for r in summary["retimed"]:
            new_time = f"{r['new_median_step_s']:.3f} s" if r["new_median_step_s"] is not None else "not rerun"
            new_score = f"{100 * r['new_score']:.2f}" if r["new_score"] is not None else "-"
            lines.append(f"- {r['run']}: {r['old_median_step_s']:.3f} s -> {new_time}; "
                         f"score {100 * r['old_score']:.2f} -> {new_score}")
    return "\n".join(lines)


def _task_figures(out: Path, summary: dict, prefix: str, draw) -> list[Path]:
    """``out/<prefix>_<task>.png`` for every task with results, each drawn by ``draw(task, cells)``."""
    written = []
    for task in summary["config"]["tasks"]:
        cells = summary["tasks"].get(task, {}).get("cells", {})
        if cells:
            fig = draw(task, cells)
            fig.tight_layout()
            written.append(ex.save_figure(fig, out / f"{prefix}_{task}.png"))
    return written


def plot_frontiers(out: Path, summary: dict) -> list[Path]:
    """Per task: validation score against retention for every rate each optimizer tried (seed 0),
    the chosen rate's seed mean marked; the pretrained model's retention as a vertical line."""
    def draw(task, cells):
        fig, ax = ex.pyplot().subplots(figsize=(6.5, 4.5))
        for opt, cell in cells.items():
            rows = [r for r in cell["grid"] if r["retention"] is not None and r["validation"] is not None]
            line, = ax.plot([100 * r["retention"] for r in rows], [100 * r["validation"] for r in rows], marker="o",
                            label=opt, alpha=0.8)
            for r in rows:
                ax.annotate(f"{r['lr']:g}", (100 * r["retention"], 100 * r["validation"]), fontsize=6,
                            color=line.get_color())
            if cell["retention_mean"] is not None:
                ax.plot(100 * cell["retention_mean"], 100 * cell["mean"], marker="*", markersize=12,
                        color=line.get_color())
        if summary.get("pretrained_retention") is not None:
            ax.axvline(100 * summary["pretrained_retention"], color="gray", linestyle="--", label="pretrained")
        ax.set(xlabel="retention: zero-shot STS-B Spearman x 100", ylabel=f"validation {TASKS[task].metric} x 100",
               title=f"{task}: task score vs. retention over each LR grid (seed 0; star: chosen rate, seed mean)")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
        return fig

    return _task_figures(out, summary, "frontier", draw)


def plot_curves(out: Path, summary: dict) -> list[Path]:
    """Per task: training loss (moving average) and held-out metric against steps, seed 0 at the
    chosen rate."""
    def draw(task, cells):
        fig, (ax_loss, ax_metric) = ex.pyplot().subplots(1, 2, figsize=(11, 4))
        for opt, cell in cells.items():
            path = _seed0_path(out, task, opt, cell)
            if path is None:
                continue
            run = json.loads(path.read_text())
            losses = run["loss_curve"]
            window = max(1, len(losses) // 20)
            smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                      for i in range(len(losses))]
            ax_loss.plot(range(1, len(losses) + 1), smooth, label=opt)
            ax_metric.plot([p["step"] for p in run["eval_curve"]], [100 * p["score"] for p in run["eval_curve"]],
                           marker="o", label=opt)
        ax_loss.set(xlabel="step", ylabel="training loss (moving average)", title=f"{task}: training loss")
        ax_metric.set(xlabel="step", ylabel=f"held-out {TASKS[task].metric} x 100", title=f"{task}: held-out slice")
        ax_loss.legend(fontsize=8)
        ax_metric.legend(fontsize=8)
        return fig

    return _task_figures(out, summary, "curves", draw)


def _seed0_path(out: Path, task: str, optimizer: str, cell: dict) -> Path | None:
    for path in sorted((out / "runs" / task / optimizer).glob(f"lr{cell['lr']:g}-*seed0.json")):
        return path
    return None
