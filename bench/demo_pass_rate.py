"""The demo's pass rate: `model-audit demo` at its defaults on several seeds, each in its own
workdir, and which of them end with a registered @challenger.

    .venv/bin/python bench/demo_pass_rate.py                       # seeds 0-9, ~25 min on 2 cores
    .venv/bin/python bench/demo_pass_rate.py --seeds 0 3 --workdir /tmp/pass-rate

Prints one row per seed (flagged, chosen candidate, candidates that passed selection, the gate
verdict and, when nothing was registered, why) and the count of registered seeds.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch  # noqa: E402

from flows.demo import run_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--workdir", type=Path, default=None, help="parent of one workdir per seed (default: temp)")
    args = parser.parse_args()
    parent = args.workdir or Path(tempfile.mkdtemp(prefix="pass-rate-"))
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; workdirs in {parent}")
    print("| seed | flagged | chosen candidate | passed selection | registered | why not |")
    print("|---|---|---|---|---|---|")
    registered = 0
    started = time.time()
    for seed in args.seeds:
        result = run_demo(parent / f"seed-{seed}", seed=seed)
        correction = result.correction
        chosen = correction.search.chosen
        passed = [o.candidate.name for o in correction.search.outcomes if o.selection.passed]
        why = "" if correction.registered_version else "; ".join(correction.failure_reasons())
        registered += correction.registered_version is not None
        print(f"| {seed} | {result.n_flagged} | {chosen.candidate.name if chosen else '-'} | "
              f"{', '.join(passed) or '-'} | {'yes' if correction.registered_version else 'no'} | {why} |",
              flush=True)
    print(f"\n{registered} of {len(args.seeds)} seeds registered a challenger ({time.time() - started:.0f} s).")


if __name__ == "__main__":
    main()
