"""The project's demo: at equal success on a new task, does NanoAdam keep more of the old one?

A miniature of :mod:`nanoadam_lab.experiments.continual` (offline, about a minute on 2 cores): a
small CNN pretrained on digits 0-4 of scikit-learn's 8x8 ``digits`` is finetuned on digits 5-9
(task 1), then on the same digits rotated by 15 degrees (similar) or by 90 degrees (dissimilar)
under another label map (task 2), and task 1 is scored again with its own head reloaded. AdamW
and NanoAdam (density 1 %) each run their whole learning-rate grid on task 2, so each draws a
frontier: task-2 accuracy against task-1 accuracy after task 2, one point per rate. The figure
shows the trade-off; the printed intervals (3 seeds) say what it supports, which at this size is
usually little. The full experiment: ``nanoadam reproduce continual``.

Run: ``nanoadam demo`` (default output ``results/demo``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .continual import ContinualConfig, main

DEMO = dict(methods=["adamw", "nanoadam-1%"], task2=["similar", "dissimilar"], seeds=3, epochs=8.0,
            channels=(16, 32, 64), widths=(256, 128), pretrain_epochs=10, mask_interval=20,
            lr_grids={"adamw": (3e-4, 1e-3, 3e-3), "nanoadam": (3e-3, 1e-2, 3e-2)}, max_grid_extensions=1,
            threads=2)


def run_demo(out_dir: str, seed: int = 0, progress: bool = True, command: str | None = None,
             **overrides) -> list[Path]:
    """Runs the demo (``overrides``: further :class:`ContinualConfig` fields), prints its tables,
    writes ``continual.json``, ``continual.md`` and one frontier figure per second task."""
    config = ContinualConfig(**{**DEMO, "first_seed": seed, **overrides})
    command = command or f"nanoadam demo --seed {seed} --out {out_dir}"
    tick = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None
    written = main(config, out_dir, command, progress=tick)
    markdown = Path(out_dir, "continual.md").read_text()
    print(markdown.split("## Settings")[0].strip())
    print("\nwrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    run_demo(sys.argv[1] if len(sys.argv) > 1 else "results/demo")
