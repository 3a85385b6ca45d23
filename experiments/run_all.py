"""Run every reproduction experiment in order (claims 1-4, then the threshold study).

python experiments/run_all.py --quick     # minutes (CI smoke)
python experiments/run_all.py             # the real experiments (about an hour on 2 cores)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["claim1_standard_optimisers.py", "claim2_gradient_manipulation.py", "claim34_selection_and_qs.py",
           "threshold_sensitivity.py"]  # fmt: skip

if __name__ == "__main__":
    for s in SCRIPTS:
        print(f"\n===== {s}", flush=True)
        subprocess.run([sys.executable, str(HERE / s), *sys.argv[1:]], check=True)
