"""Run the benchmarks one after another and write one markdown table of their results.

Each benchmark runs as its own process with ``--json`` and prints one summary line
(bench/support.py's JSON_MARK); this collects them into a table: benchmark, metric,
result, its same-run baseline, the ratio, the goal of the issue that asked for it, and
whether it is met. ``--quick`` (the default) uses small sizes that finish in minutes;
``--full`` uses each benchmark's own defaults (the issues' sizes). The soak runs only
with ``--soak``.

    .venv/bin/python bench/run_all.py                 # quick, writes bench/RESULTS.md
    .venv/bin/python bench/run_all.py --full --soak
    .venv/bin/python bench/run_all.py --only fleet,log_latency --out -
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import JSON_MARK
from schemas.clock import utc_now

HERE = Path(__file__).resolve().parent

#: name -> (quick arguments, full arguments).
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    "guest_boot": (["--runs", "1"], []),
    "gateway": (["--requests", "200"], []),
    "log_latency": (["--seconds", "10"], []),
    "fleet": (["--hosts", "10", "--instances", "1000", "--baseline-ops", "500"], []),
    "soak": (["--minutes", "1"], []),
    "wake": (["--rounds", "3"], ["--rounds", "10"]),
    "fork": (["--runs", "2", "--forks", "10"], ["--runs", "5", "--forks", "10"]),
}
ISSUES = {
    "guest_boot": "[2/9]",
    "gateway": "[4/9]",
    "fleet": "[6/9]",
    "log_latency": "[8/9]",
    "soak": "[8/9]",
    "wake": "[4/6]",
    "fork": "[6/6]",
}


def run_one(name: str, extra: list[str], timeout_s: float) -> tuple[dict[str, object] | None, str]:
    """Run one benchmark; (its JSON summary or None, a note on how it went)."""
    argv = [sys.executable, str(HERE / f"{name}.py"), *extra, "--json"]
    print(f"== {name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=HERE.parent
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    took = time.monotonic() - started
    sys.stderr.write(done.stdout)
    summary = None
    for line in done.stdout.splitlines():
        if line.startswith(JSON_MARK):
            summary = json.loads(line[len(JSON_MARK) :])
    note = f"exit {done.returncode}, {took:.0f} s"
    if summary is None:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        note += f"; no summary: {tail[-300:]}"
    return summary, note


def cell(value: object) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "/")


def render(
    results: list[tuple[str, dict[str, object] | None, str]], mode: str, started: datetime
) -> str:
    load = os.getloadavg()
    out = [
        "# Benchmark results",
        "",
        f"{started:%Y-%m-%d %H:%M} UTC, `{mode}` sizes, {os.cpu_count()} CPUs, load average "
        f"at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}. Baselines are measured "
        "in the same run; ratios are result / baseline. `bench/fleet.py` runs on simulated "
        "hosts (a benchmark instrument for the control plane, not VMs).",
        "",
        "| benchmark | metric | result | baseline (same run) | ratio | goal | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for name, summary, note in results:
        label = f"{name} {ISSUES.get(name, '')}".strip()
        if summary is None:
            out.append(f"| {label} | (did not finish) | | | | | no |")
            notes.append(f"- {name}: {note}")
            continue
        rows = summary.get("results") or []
        assert isinstance(rows, list)
        for row in rows:
            met = row.get("met")
            unit = row.get("unit") or ""
            result = f"{cell(row.get('result'))} {unit}".strip()
            baseline = cell(row.get("baseline"))
            if baseline and row.get("baseline_name"):
                baseline = f"{baseline} {unit} ({row['baseline_name']})".replace("  ", " ")
            ratio = f"{row['ratio']:g}x" if isinstance(row.get("ratio"), int | float) else ""
            out.append(
                f"| {label} | {cell(row.get('metric'))} | {result} | {baseline} | {ratio} | "
                f"{cell(row.get('goal'))} | {'' if met is None else ('yes' if met else 'no')} |"
            )
        params = summary.get("params")
        shown = ", ".join(f"{k}={v}" for k, v in params.items()) if isinstance(params, dict) else ""
        notes.append(f"- {name} ({shown}; {note})")
        extra = summary.get("notes")
        notes += [f"  - {line}" for line in extra] if isinstance(extra, list) else []
    return "\n".join([*out, "", "Runs:", *notes, ""])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (the default)")
    size.add_argument("--full", action="store_true", help="each benchmark's full defaults")
    parser.add_argument("--soak", action="store_true", help="include the soak")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="'-' prints it")
    parser.add_argument("--timeout-s", type=float, default=3600, help="per benchmark")
    args = parser.parse_args()
    names = [n for n in BENCHES if n != "soak" or args.soak]
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - set(BENCHES)
        if unknown:
            parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
        names = [n for n in BENCHES if n in wanted]
    mode = "full" if args.full else "quick"
    started = utc_now()
    results = []
    for name in names:
        quick, full = BENCHES[name]
        summary, note = run_one(name, full if args.full else quick, args.timeout_s)
        results.append((name, summary, note))
    text = render(results, mode, started)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(text)
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
