"""The memory guard's estimates against the peaks they predict (issue 17).

    python benchmarks/bench_large.py guard [--models demo CUT] [--jobs stats rtn ...]

Runs each job of `bench_large_jobs.py` in a fresh child process on each model and prints, side
by side, the child's own peak RSS (`ru_maxrss`: load-independent) and the estimate
`memory.estimate_*` made in the same child before the job; a row more than `TOLERANCE` off is
marked. The demo is held in memory (its default); the 2-block cut of the 3B shapes
(`bench_large.py make --layers 2`) is streamed, as a 3B model is (`auto` would hold the cut).
An export's GGUF check runs llama.cpp in a process of its own: its peak is printed on a row of
its own, against the part of the estimate that counts it (`ExportFormat.runtime_bytes`).

Settings are smaller than the CLI's defaults so a table takes minutes, not hours, on a loaded
2-core machine (calibration $STUDIO_LARGE_CALIB, default 4x256; evaluation $STUDIO_LARGE_EVAL,
default 2x512): an estimate is a function of its settings, so it must hold at these too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TOLERANCE = 0.15
SETTINGS = {"STUDIO_LARGE_CALIB": "4x256", "STUDIO_LARGE_EVAL": "2x512"}
# the variants made here (small settings) are not the ones eval-variant and export read
SAVE_TO = Path(os.environ.get("TMPDIR", "/tmp")) / "fit-guard-variants"


def guard_table(models: list[str], jobs: list[str], out: Path | None, run_in_child) -> int:
    rows = []
    for model in models:
        streamed = model != "demo"
        for job in jobs:
            env = {**SETTINGS, **{k: os.environ[k] for k in SETTINGS if k in os.environ},
                   "COMPRESSION_STUDIO_WEIGHTS": "stream" if streamed else "auto",
                   "STUDIO_LARGE_SAVE_TO": str(SAVE_TO)}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                record = run_in_child(job, model)
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
            record["settings"] = {k: env[k] for k in SETTINGS}
            if out:
                with open(out, "a") as f:
                    f.write(json.dumps(record) + "\n")
            for row in table_rows(record):
                rows.append(row)
                print(format_row(row), flush=True)
    print("\n" + "\n".join(markdown(rows)))
    return 0


def print_table(files: list[Path]) -> int:
    """The table of earlier runs' JSON lines (`--out`), the last run of each row kept."""
    rows: dict[tuple, dict] = {}
    for file in files:
        for line in Path(file).read_text().splitlines():
            for row in table_rows(json.loads(line)):
                rows[row["model"], row["job"]] = row
    print("\n".join(markdown(list(rows.values()))))
    return 0


def table_rows(record: dict) -> list[dict]:
    """A record's rows: the job's own peak against its estimate; an export's llama.cpp process
    against its part of the estimate."""
    name = "demo" if record["model"] == "demo" else Path(record["model"]).name
    if record.get("exit") != 0:
        return [{"model": name, "job": record["job"], "peak": None, "estimate": None,
                 "note": record.get("error", "failed")}]
    rows = [{"model": name, "job": record["job"], "streamed": record.get("streamed"),
             "peak": record.get("peak_rss_self_mib"), "estimate": record.get("estimate_mib"),
             "note": record.get("note", "")}]
    if record.get("runtime_estimate_mib"):
        rows.append({"model": name, "job": f"{record['job']}: llama.cpp's process",
                     "streamed": record.get("streamed"),
                     "peak": record.get("consumer_peak_mib"),
                     "estimate": record["runtime_estimate_mib"], "note": ""})
    return rows


def off(row: dict) -> float | None:
    if not row.get("peak") or row.get("estimate") is None or row.get("note"):
        return None   # (a note: the estimate is not of this peak)
    return row["estimate"] / row["peak"] - 1


def format_row(row: dict) -> str:
    ratio = off(row)
    flag = "" if ratio is None or abs(ratio) <= TOLERANCE else "  <-- off by more than 15%"
    shown = "-" if ratio is None else f"{ratio:+.0%}"
    return (f"{row['model']:>28} {row['job']:>32}  peak {row.get('peak')} MiB  estimate "
            f"{row.get('estimate')} MiB  ({shown}){flag} {row.get('note', '')}")


def markdown(rows: list[dict]) -> list[str]:
    lines = ["| model | job | peak RSS (MiB) | guard estimate (MiB) | estimate vs peak |",
             "|---|---|---|---|---|"]
    for row in rows:
        ratio = off(row)
        shown = "-" if ratio is None else f"{ratio:+.0%}" + (
            " **(off > 15%)**" if abs(ratio) > TOLERANCE else "")
        lines.append(f"| {row['model']}{' (streamed)' if row.get('streamed') else ''} | "
                     f"{row['job']} | {row.get('peak') or row.get('note')} | "
                     f"{row.get('estimate')} | {shown} |")
    return lines
