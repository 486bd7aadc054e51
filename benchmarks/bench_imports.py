"""Start-up cost: ``import kernelprop`` and ``kernelprop --help`` in fresh interpreters (median of runs).

Usage: python benchmarks/bench_imports.py [--quick]
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time

from results import result


def median_seconds(cmd, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    runs = 3 if "--quick" in sys.argv else 11
    bare = median_seconds([sys.executable, "-c", "pass"], runs)
    imp = median_seconds([sys.executable, "-c", "import kernelprop"], runs)
    script = shutil.which("kernelprop")      # the installed command; else the module form
    helps = median_seconds([script, "--help"] if script else [sys.executable, "-m", "kernelprop", "--help"], runs)
    print(f"| command | median s ({runs} runs) |\n|---|---:|\n| python -c pass | {bare:.3f} |\n"
          f"| python -c 'import kernelprop' | {imp:.3f} |\n| kernelprop --help | {helps:.3f} |\n")
    result("import kernelprop", imp, "s", "<= 0.3")
    result("kernelprop --help", helps, "s", "<= 0.3")


if __name__ == "__main__":
    main()
