"""Static sm_90 report of the low-rank and hybrid kernels, taken on a CPU machine: no GPU needed.

    python bench/sass_report.py                 # default problems, the config the tuner would choose (~2 min)
    python bench/sass_report.py --all           # every "max" candidate of each problem (long)
    python bench/sass_report.py --proxy         # only the proxy-target problems; exit 1 if a target fails
    python bench/sass_report.py --hybrid        # only the hybrid problems
    python bench/sass_report.py --json PATH     # also write one record per compiled kernel
    python bench/sass_report.py --dry-run       # one small problem, seconds: the plumbing

The parts live in bench/sass/ (see its __init__): compile, disassemble, hot-loop analysis, the time model (every
time it prints is an ESTIMATE, not a measurement), the targets, the report. SASS_REPORT_DUMP=DIR keeps each
kernel's SASS and Triton IR there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sass.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
