"""Kill -9 and full-disk trials of the studio's saves (variant folders, recipe files, sessions,
exports).

Per kind: `--trials` savers each killed with SIGKILL at a random moment (0-0.5 s after their
first save, 0-3 s for an export; they save generation after generation in a loop, so most kills land inside a
save), then the target is checked to be one complete generation and the next save to check it
leaves no temporary. Then one kill at each step of the write itself (`crash.PHASES`: while
writing, before and after the swap or rename), made certain by killing from inside the save. Then `--disk-trials` saves under a random file-size limit (RLIMIT_FSIZE
between 1 byte and just over the largest file): each must end in a StudioError (exit 2) that
leaves the previous generation intact, or fit and succeed. Mechanics: tests/fuzz/crash.py.
Exit status 1 when any trial failed.

    PYTHONPATH=. python benchmarks/crash_writes.py [--trials 50] [--disk-trials 30] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50, help="kills per kind (default 50)")
    parser.add_argument("--disk-trials", type=int, default=30, help="per kind (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from tests.fuzz.crash import (KILL_WITHIN, KINDS, PHASES, Savers, disk_full_trial,
                                  generation_of, kill_trial, phase_trial, save, temporaries)

    rng = random.Random(args.seed)
    failures = 0
    savers = Savers()
    try:
        with tempfile.TemporaryDirectory(prefix="studio-crash-") as tmp:
            print(f"{'kind':<8} {'kills':>6} {'complete':>9} {'mid-save':>9} {'left after':>10}")
            for kind in KINDS:
                target = Path(tmp) / (f"{kind}.json" if kind == "plan" else kind)
                complete = mid = left = 0
                for _ in range(args.trials):
                    try:
                        outcome = kill_trial(savers, kind, target,
                                             rng.uniform(0.0, KILL_WITHIN.get(kind, 0.5)))
                    except AssertionError as exc:
                        failures += 1
                        print(f"    FAILED: {exc}")
                        continue
                    complete += 1
                    mid += outcome["leftovers"] > 0
                    left += outcome["after_next_save"]
                failures += left
                print(f"{kind:<8} {args.trials:>6} {complete:>9} {mid:>9} {left:>10}", flush=True)
            print(f"\n{'kind':<8} {'killed at':<14} {'holds':>6} {'expected':>8} "
                  f"{'leftovers':>9} {'left after':>10}")
            for (kind, phase), expected in PHASES.items():
                target = Path(tmp) / f"phase-{kind}{'.json' if kind == 'plan' else ''}"
                o = phase_trial(savers, kind, phase, target)
                ok = o["status"] == -9 and o["generation"] == expected and not o["after_next_save"]
                failures += not ok
                print(f"{kind:<8} {phase:<14} {o['generation']:>6} {expected:>8} "
                      f"{o['leftovers']:>9} {o['after_next_save']:>10}{'' if ok else '  FAILED'}")
            print(f"\n{'kind':<8} {'disk full':>9} {'refused':>8} {'kept old':>9} {'fitted':>7} "
                  f"{'left':>5}")
            for kind in KINDS:
                target = Path(tmp) / f"disk-{kind}{'.json' if kind == 'plan' else ''}"
                save(kind, target, 5)
                largest = max((p.stat().st_size for p in ([target] if target.is_file()
                                                          else target.iterdir())), default=1)
                refused = kept = fitted = left = 0
                for _ in range(args.disk_trials):
                    save(kind, target, 5)
                    limit = rng.randint(1, int(largest * 1.05))
                    status, message = disk_full_trial(savers, kind, target, limit)
                    generation = generation_of(kind, target)
                    if status == 2 and "disk is full" in message:
                        refused += 1
                        kept += generation == 5
                    elif status == 0 and generation == 99:
                        fitted += 1
                    else:
                        failures += 1
                        print(f"    FAILED at limit {limit}: status {status}: {message[:300]}")
                    left += len(temporaries(target))
                failures += (refused - kept) + left
                print(f"{kind:<8} {args.disk_trials:>9} {refused:>8} {kept:>9} {fitted:>7} "
                      f"{left:>5}", flush=True)
    finally:
        savers.close()
    print(f"\n{'no failures' if not failures else f'{failures} FAILURES'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
