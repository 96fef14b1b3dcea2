"""Fuzz every file kind the studio reads from strangers, for longer than the test suite does.

Builds a tiny random Llama and valid files of each kind (GGUF, safetensors, config.json, recipe,
sensitivity result, variant folder), mutates them with `tests/fuzz/harness.py`'s seeded loop and
prints, per kind, the iterations, how many mutants were accepted / refused with a StudioError,
the slowest load, and every finding (an exception other than StudioError, or a load slower than
the harness's limit). Exit status 1 when anything was found.

The address space is capped (--max-gb, default 6) so that a loader allocating what a header
claims shows up as a MemoryError finding instead of swapping the machine.

    PYTHONPATH=. python benchmarks/fuzz_files.py [--seconds 60] [--seed 0] [--kinds gguf,config]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per kind (default 60)")
    parser.add_argument("--iterations", type=int, default=None, help="per kind, instead of time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="", help="comma-separated (default: all)")
    parser.add_argument("--max-gb", type=float, default=6.0, help="address-space cap")
    parser.add_argument("--show", type=int, default=20, help="findings shown per kind")
    args = parser.parse_args()

    os.environ.setdefault("COMPRESSION_STUDIO_CACHE", tempfile.mkdtemp(prefix="studio-fuzz-cache-"))
    from studio.core.jobs import run
    from studio.core.models import open_model_job
    from tests.fuzz.harness import fuzz_kind, make_kinds
    from tests.tiny_models import make_tiny_model, tiny_tokenizer

    with tempfile.TemporaryDirectory(prefix="studio-fuzz-") as tmp:
        root = Path(tmp)
        folder = make_tiny_model("llama", root / "llama", tiny_tokenizer())
        handle = run(open_model_job(folder))
        kinds = make_kinds(root / "seeds", folder, handle)
        wanted = [k for k in args.kinds.split(",") if k] or list(kinds)
        if args.max_gb:
            limit = int(args.max_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        found = 0
        print(f"{'kind':<12} {'iterations':>10} {'accepted':>9} {'refused':>8} {'findings':>9} "
              f"{'slowest s':>9} {'seconds':>8}")
        for name in wanted:
            stats = fuzz_kind(kinds[name], args.seed, args.iterations,
                              None if args.iterations else args.seconds)
            found += len(stats.findings)
            print(f"{name:<12} {stats.iterations:>10} {stats.accepted:>9} {stats.refused:>8} "
                  f"{len(stats.findings):>9} {stats.slowest:>9.2f} {stats.seconds:>8.1f}",
                  flush=True)
            for finding in stats.findings[:args.show]:
                print(f"    {finding}", flush=True)
        return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
