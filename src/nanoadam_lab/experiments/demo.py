"""The project's demo: does NanoAdam forget less than AdamW? (offline, about 40 s on one CPU thread)

The vision comparison of :mod:`nanoadam_lab.experiments.forgetting` restricted to AdamW and NanoAdam:
a small CNN pretrained on digits 0-4 of scikit-learn's 8x8 digits, finetuned on digits 5-9 (task 1)
and then on the same digits rotated by 90 degrees (task 2, new head); task 1 is scored again with
its own head reloaded. Learning rates are tuned on held-out training data. Prints the table and
NanoAdam's paired differences with their intervals, and writes ``forgetting.json``, then renders
``forgetting.md`` and ``forgetting_vision.png`` from it into ``out_dir``.

Run: ``nanoadam demo`` (or ``python -m nanoadam_lab.experiments.demo [out_dir]``; default ``results/demo``).
"""

from __future__ import annotations

import sys
from typing import Any

from .forgetting import ForgettingConfig, VisionConfig, comparison_table, domain_table, run, write_outputs

DEMO_OPTIMIZERS = ("adamw", "nanoadam")


def run_demo(out_dir: str, seed: int = 0, progress: bool = True, command: str | None = None,
             **vision_overrides: Any) -> dict:
    """Runs the AdamW-vs-NanoAdam forgetting comparison, prints its table and writes the outputs.

    ``vision_overrides``: further :class:`VisionConfig` fields (e.g. ``epochs=2`` for a quick check)."""
    vision = VisionConfig(seed=seed, optimizers=list(DEMO_OPTIMIZERS), **vision_overrides)
    command = command or (f"python -c \"from nanoadam_lab.experiments.demo import run_demo; "
                          f"run_demo({out_dir!r}, seed={seed})\"")
    result = run(ForgettingConfig(vision=vision, language=None, command=command), progress=progress)
    written = write_outputs(result, out_dir)
    domain = result["domains"]["vision"]
    print(f"\nContinual finetuning, digits CNN ({domain['data']['tasks'][0]} -> {domain['data']['tasks'][1]}), "
          f"accuracy x 100, {len(domain['seeds'])} seeds, {result['elapsed_s']:.0f} s:\n")
    print(domain_table(domain))
    print("\nNanoAdam minus AdamW, paired by seed (a verdict only where the 95 % interval excludes 0):\n")
    print(comparison_table(domain))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return result


if __name__ == "__main__":
    run_demo(sys.argv[1] if len(sys.argv) > 1 else "results/demo")
