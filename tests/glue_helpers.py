"""What the GLUE-run tests share: the offline GLUE folder, a tiny run budget, an in-process executor."""

import os

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
if not os.path.isdir(DATA):
    DATA = "/work/shared/data/glue"
# Settings that make a GLUE run take seconds: 60 examples, 2 steps, short sequences, a small probe.
TINY = dict(train_limit=60, eval_limit=40, max_steps=2, max_length=32, batch_size=8, epochs=1.0, eval_points=1,
            probe_limit=24)


def in_process(calls):
    """An executor for ``RunLedger`` that runs each GLUE run in this process, noting its path."""
    from nanoadam_lab.experiments.compare import _write_atomic
    from nanoadam_lab.experiments.glue import run

    def execute(config, path):
        calls.append(path)
        _write_atomic(path, run(config))
    return execute
