"""Tables and figures of a comparison, read from the run files on disk (never recomputed)."""

from __future__ import annotations

import json
from pathlib import Path

from .glue_data import TASKS

METRIC_NAMES = {"accuracy": "acc", "matthews": "MCC", "pearson": "Pearson"}


def glue_table(summary: dict) -> str:
    """Markdown like the paper's Table 2 (metric x 100, mean +- std over seeds), with the average,
    wall time per step, peak memory, untouched fraction and parameter shift."""
    tasks = summary["config"]["tasks"]
    optimizers = summary["config"]["optimizers"]
    cells = summary["cells"]
    head = ["optimizer"] + [f"{t.upper()} ({METRIC_NAMES[TASKS[t].metric]})" for t in tasks] + [
        "avg", "step time (s)", "opt. step (ms)", "peak mem. (MB)", "untouched", "L2 shift"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for opt in optimizers:
        row = [opt]
        stats = [cells[t][opt] for t in tasks if opt in cells.get(t, {})]
        for t in tasks:
            c = cells.get(t, {}).get(opt)
            row.append(f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f}" if c else "-")
        avg = summary["average"].get(opt)
        row.append(f"**{100 * avg:.2f}**" if avg is not None else "-")
        if stats:
            row += [f"{_mean(stats, 'median_step_s'):.3f}", f"{1e3 * _mean(stats, 'median_optimizer_step_s'):.1f}",
                    f"{_mean(stats, 'peak_memory_increase_mb'):.0f}",
                    f"{100 * _mean(stats, 'untouched_fraction'):.1f} %", f"{_mean(stats, 'l2_shift'):.3f}"]
        else:
            row += ["-"] * 5
        lines.append("| " + " | ".join(row) + " |")
    if "finished_runs" in summary:
        lines += ["", f"{summary['finished_runs']} finished runs (tuning and final); their training loops took "
                  f"{summary['train_seconds_total'] / 3600:.2f} h in all (loading, tokenizing and evaluation "
                  "not included)."]
    if summary.get("retimed"):
        lines += ["", "Reran for timing (the first run's step time was disturbed or confounded with run order); "
                  "the table uses the rerun. Median step time and score, first run -> rerun:", ""]
        for r in summary["retimed"]:
            new_time = f"{r['new_median_step_s']:.3f} s" if r["new_median_step_s"] is not None else "not rerun"
            new_score = f"{100 * r['new_score']:.2f}" if r["new_score"] is not None else "-"
            lines.append(f"- {r['run']}: {r['old_median_step_s']:.3f} s -> {new_time}; "
                         f"score {100 * r['old_score']:.2f} -> {new_score}")
    lines += ["", "Learning rates chosen on the held-out slice (held-out score per grid value):", ""]
    for t in tasks:
        chosen = "; ".join(f"{o} **{cells[t][o]['lr']:g}** ({_grid_scores(cells[t][o]['tuning'])})"
                           for o in optimizers if o in cells.get(t, {}))
        lines.append(f"- {t}: {chosen}")
    return "\n".join(lines)


def _grid_scores(tuning: dict[str, float]) -> str:
    return ", ".join(f"{float(lr):g}: {100 * score:.1f}" for lr, score in tuning.items())


def _mean(cells: list[dict], key: str) -> float:
    values = [c[key] for c in cells if c[key] is not None]
    return sum(values) / len(values) if values else float("nan")


def plot_curves(out: Path, summary: dict) -> list[Path]:
    """Per task: training loss (moving average) and validation metric against steps, seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in summary["config"]["tasks"]:
        cells = summary["cells"].get(task, {})
        if not cells:
            continue
        fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
        for opt, cell in cells.items():
            path = out / "runs" / task / opt / f"final-lr{cell['lr']:g}-seed0.json"
            if not path.exists():
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
        ax_metric.set(xlabel="step", ylabel=f"validation {TASKS[task].metric} x 100", title=f"{task}: validation")
        ax_loss.legend(fontsize=8)
        ax_metric.legend(fontsize=8)
        fig.tight_layout()
        target = out / f"curves_{task}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written
