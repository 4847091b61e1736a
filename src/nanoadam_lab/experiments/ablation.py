"""``nanoadam reproduce ablation``: which weights to update, on SST-2 with MiniLM (paper Sec. 3.2).

Studies, all NanoAdam at the same density, the same data order and budget:
  * selection (Fig. 4a): small vs random vs large weights, one learning rate (the one tuned for
    small weights);
  * small weights vs large gradients (Fig. 4b): each with its own learning rate tuned on a slice
    held out of the training set, plus large gradients at small weights' rate (the paper finds they
    diverge there);
  * static vs dynamic mask (Table 14), same rate;
  * mask-interval sensitivity (Table 11), same rate.
Learning rates are tuned on held-out training data, never on the validation set that is reported.
Every run goes through the same resumable ledger as ``nanoadam compare``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import experiment as ex
from .compare import RunLedger, best_lr
from .glue import GlueRunConfig


@dataclass
class AblationConfig:
    task: str = "sst2"
    model: str = "minilm"
    data_dir: str | None = None
    out: str = "results/ablation"
    seeds: int = 2
    threads: int = 2
    density: float = 0.1
    mask_interval: int = 10  # the dynamic mask of the other studies
    small_lr_grid: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    gradient_lr_grid: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    intervals: list[int] = field(default_factory=lambda: [1, 5, 25, 50])
    run_settings: dict[str, Any] = field(default_factory=lambda: dict(
        train_limit=2000, epochs=1.0, max_length=64, batch_size=16, eval_points=3))

    def glue_config(self, lr: float, seed: int, phase: str, **overrides) -> GlueRunConfig:
        settings = dict(self.run_settings)
        if phase == "tune":
            settings["eval_points"] = 0
        return GlueRunConfig(task=self.task, optimizer="nanoadam", lr=lr, seed=seed, model=self.model,
                             data_dir=self.data_dir, threads=self.threads,
                             eval_split="heldout" if phase == "tune" else "validation",
                             optimizer_overrides={"density": self.density, "mask_interval": self.mask_interval,
                                                  **overrides}, **settings)


def _variants(config: AblationConfig, lr_small: float, lr_grad: float) -> dict[str, tuple[dict, float, int]]:
    """name -> (optimizer overrides, learning rate, seeds)."""
    seeds = config.seeds
    out = {
        "small_weights": ({"selection": "small_weights"}, lr_small, seeds),
        "random_weights": ({"selection": "random"}, lr_small, seeds),
        "large_weights": ({"selection": "large_weights"}, lr_small, seeds),
        "large_gradients": ({"selection": "large_gradients"}, lr_grad, seeds),
        "static_mask": ({"mask_interval": None}, lr_small, seeds),
    }
    if lr_grad != lr_small:
        out["large_gradients_at_small_weights_lr"] = ({"selection": "large_gradients"}, lr_small, seeds)
    for m in config.intervals:
        out[f"interval_{m}"] = ({"mask_interval": m}, lr_small, 1)
    return out


def run(config: AblationConfig, execute=None, progress=None) -> dict:
    out = Path(config.out)
    planned = (len(config.small_lr_grid) + len(config.gradient_lr_grid) + 6 * config.seeds + len(config.intervals))
    ledger = RunLedger(planned, execute, progress)

    def tune(selection: str, grid: list[float]) -> tuple[float, dict[float, float]]:
        results = {}
        for lr in grid:
            r = ledger.ensure(config.glue_config(lr, 0, "tune", selection=selection),
                              out / "runs" / f"tune-{selection}-lr{lr:g}.json")
            if r is not None:
                results[lr] = r
        return best_lr(results), {lr: r["score"] for lr, r in results.items()}

    lr_small, tuning_small = tune("small_weights", config.small_lr_grid)
    lr_grad, tuning_grad = tune("large_gradients", config.gradient_lr_grid)
    variants = {}
    for name, (overrides, lr, seeds) in _variants(config, lr_small, lr_grad).items():
        runs = []
        for seed in range(seeds):
            r = ledger.ensure(config.glue_config(lr, seed, "final", **overrides),
                              out / "runs" / f"{name}-lr{lr:g}-seed{seed}.json")
            if r is not None:
                runs.append(r)
        if runs:
            scores = [r["score"] for r in runs]
            variants[name] = {
                "lr": lr, "overrides": overrides, "scores": scores, "mean": statistics.fmean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "final_loss": statistics.fmean(statistics.fmean(r["loss_curve"][-10:]) for r in runs),
                "untouched_fraction": statistics.fmean(r["untouched_fraction"] for r in runs),
                "l2_shift": statistics.fmean(r["l2_shift"] for r in runs),
                "diverged": any(r["metrics"].get("diverged") for r in runs),
                "run_files": [f"runs/{name}-lr{lr:g}-seed{s}.json" for s in range(seeds)],
            }
    return {"config": asdict(config), "tuning": {"small_weights": tuning_small, "large_gradients": tuning_grad},
            "lr_small_weights": lr_small, "lr_large_gradients": lr_grad, "variants": variants,
            "failures": ledger.failures}


def render(result: dict, out_dir: str) -> list[Path]:
    """``ablation.md`` (a table per study, the tuning, the settings) and ``ablation_curves.png``,
    from the result and its run files on disk."""
    c, v = result["config"], result["variants"]

    def row(name, label):
        if name not in v:
            return [label, "-", "-", "-", "-", "-"]
        x = v[name]
        flag = " (diverged)" if x["diverged"] else ""
        return [label, f"{x['lr']:g}", f"{100 * x['mean']:.2f} ± {100 * x['std']:.2f}{flag} (n={len(x['scores'])})",
                f"{x['final_loss']:.3f}", f"{100 * x['untouched_fraction']:.1f} %", f"{x['l2_shift']:.3f}"]

    head = ["variant", "lr", "validation accuracy (%)", "final training loss", "untouched", "L2 shift"]
    studies = [
        ("Small vs random vs large weights (Fig. 4a), same learning rate",
         [row("small_weights", "small weights"), row("random_weights", "random weights"),
          row("large_weights", "large weights")]),
        ("Small weights vs large gradients (Fig. 4b), each at its tuned learning rate",
         [row("small_weights", "small weights"), row("large_gradients", "large gradients"),
          row("large_gradients_at_small_weights_lr", "large gradients at small weights' rate")]),
        ("Dynamic vs static mask (Table 14)",
         [row("small_weights", f"dynamic (every {c['mask_interval']} steps)"), row("static_mask", "static")]),
        ("Mask interval (Table 11)",
         [*(row(f"interval_{m}", f"every {m} steps") for m in c["intervals"]),
          row("small_weights", f"every {c['mask_interval']} steps (the main runs)")]),
    ]
    sections = []
    for title, rows in studies:
        sections += [f"## {title}", "", ex.markdown_table(head, rows), ""]
    tuning = ex.markdown_table(["selection", "held-out score per rate", "chosen"], [
        ["small weights", _rates(result["tuning"]["small_weights"]), f"{result['lr_small_weights']:g}"],
        ["large gradients", _rates(result["tuning"]["large_gradients"]), f"{result['lr_large_gradients']:g}"]])
    sections += ["## Tuning (held-out score per rate)", "", tuning, ""]
    figure = plot(result, Path(out_dir))
    sections += [f"![curves]({figure.name})", "", "## Settings", "", ex.settings_table(c)]
    title = f"Ablation on {c['task'].upper()} (paper Fig. 4a, 4b, Table 14, Table 11)"
    return [figure, ex.write_markdown(out_dir, "ablation", title, result, sections)]


def _rates(tuning: dict) -> str:
    return ", ".join(f"{float(lr):g}: {100 * score:.2f}" for lr, score in tuning.items())


def main(config: AblationConfig, command: str | None = None, execute=None, progress=None) -> dict:
    """Runs (or resumes) the ablation, writes ``ablation.json`` to ``config.out`` and renders from it."""
    result = {"command": command, "machine": ex.machine_info(), **run(config, execute, progress)}
    ex.write_result(config.out, "ablation", result)
    render(ex.read_result(config.out, "ablation"), config.out)
    return result


def plot(result: dict, out: Path) -> Path:
    plt = ex.pyplot()

    panels = [("Fig. 4a: which weights", ["small_weights", "random_weights", "large_weights"]),
              ("Fig. 4b: small weights vs large gradients", ["small_weights", "large_gradients",
                                                            "large_gradients_at_small_weights_lr"]),
              ("Table 14: dynamic vs static", ["small_weights", "static_mask"])]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for col, (title, names) in enumerate(panels):
        for name in names:
            if name not in result["variants"]:
                continue
            run = json.loads((out / result["variants"][name]["run_files"][0]).read_text())
            losses = run["loss_curve"]
            w = max(1, len(losses) // 15)
            smooth = [sum(losses[max(0, i - w + 1): i + 1]) / len(losses[max(0, i - w + 1): i + 1])
                      for i in range(len(losses))]
            axes[0, col].plot(range(1, len(losses) + 1), smooth, label=name)
            axes[1, col].plot([p["step"] for p in run["eval_curve"]], [100 * p["score"] for p in run["eval_curve"]],
                              marker="o", label=name)
        axes[0, col].set(title=title, xlabel="step", ylabel="training loss (moving average)")
        axes[1, col].set(xlabel="step", ylabel="validation accuracy (%)")
        axes[0, col].legend(fontsize=8)
        axes[1, col].legend(fontsize=8)
    fig.tight_layout()
    return ex.save_figure(fig, out / "ablation_curves.png")
