"""python benchmarks/step.py [--json out.json]: NanoAdam vs fused/foreach AdamW step time.

The same as `nanoadam bench step`; see nanoadam_lab/bench/step.py for the method.
"""

import sys

from nanoadam_lab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "step", *sys.argv[1:]]))
