"""tools/gpu_check.sh's last step: the parts it ran (a TSV) -> one JSON file and a printed table.

    python tools/gpu_check_report.py --parts LOGS/parts.tsv --meta LOGS/meta.json --out gpu_check.json \\
        --budget 480 --elapsed 431 --mode gpu

parts.tsv has one line per part: name, kind (tests or bench), status (passed, failed, timeout, skipped),
seconds, budget, reason, log file. A bench part's result is the JSON line bench.py prints last; a tests part's
counts come from pytest's summary line,
and a tests run whose every test skipped (no CUDA) is reported as skipped.
Exit status 0 when no part failed or timed out, 1 otherwise.
"""

import argparse
import json
import re
import sys

# Table columns: (header, row key, bench.py key, scale, format). The baseline row reads the same bench.py keys
# with a "baseline_" prefix (bench.py --baseline reports no sample or warm-up time for it).
COLUMNS = [("img/s", "img_per_s", "img_per_s", 1, "{:.1f}"),
           ("TFLOP/s", "tflops", "tflops", 1, "{:.3g}"),
           ("MFU", "mfu", "mfu", 1, "{:.1%}"),
           ("peak GiB", "peak_mem_gib", "peak_mem_mb", 1 / 1024, "{:.1f}"),
           ("iter ms", "iter_ms", "iter_ms", 1, "{:.1f}"),
           ("warmup s", "warmup_s", "warmup_s", 1, "{:.1f}")]
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)")


def tail(path, lines=30):
    if not path:
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def bench_result(path):
    """The last line of bench.py's output as a dict, or None when it printed no JSON."""
    with open(path, errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.startswith("{")]
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def pytest_counts(path):
    """{"passed": n, "skipped": m, ...} from pytest's final summary line."""
    with open(path, errors="replace") as f:
        summary = [line for line in f.read().splitlines() if PYTEST_COUNT.search(line)]
    counts = {}
    for number, word in PYTEST_COUNT.findall(summary[-1] if summary else ""):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def read_part(fields):
    name, kind, status, seconds, budget, reason, log = fields
    part = dict(name=name, kind=kind, status=status, seconds=int(seconds), budget_s=int(budget),
                reason=reason, log=log or None)
    if log and kind == "tests":
        part["counts"] = counts = pytest_counts(log)
        if status == "passed" and counts.get("skipped", 0) and not counts.get("passed", 0):
            part.update(status="skipped", reason=f"all {counts['skipped']} tests skipped (no CUDA)")
    if log and kind == "bench":
        part["result"] = bench_result(log)
        if status == "passed" and part["result"] is None:
            part.update(status="failed", reason="bench.py printed no JSON result")
    if part["status"] in ("failed", "timeout"):
        part["log_tail"] = tail(log)
    return part


def table_rows(parts):
    """One row per bench result, and one for the authors'-step baseline measured in the same run."""
    def row(name, result, prefix=""):
        values = {key: result.get(prefix + source) for _, key, source, _, _ in COLUMNS}
        return dict(part=name, **{key: None if value is None else value * scale
                                  for (_, key, _, scale, _), value in zip(COLUMNS, values.values())})

    rows = []
    for part in parts:
        result = part.get("result")
        if part["kind"] == "bench" and result:
            rows.append(row(part["name"], result))
            if "baseline_iter_ms" in result:
                rows.append(row(part["name"] + " baseline", result, prefix="baseline_"))
    return rows


def format_table(rows):
    header = ["part"] + [title for title, *_ in COLUMNS]
    body = [[row["part"]] + ["-" if row[key] is None else fmt.format(row[key])
                             for _, key, _, _, fmt in COLUMNS]
            for row in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join([line[0].ljust(widths[0])]
                               + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])])
                     for line in [header] + body)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--elapsed", type=int, required=True)
    p.add_argument("--mode", choices=["gpu", "cpu-smoke"], required=True)
    args = p.parse_args(argv)
    with open(args.parts) as f:
        parts = [read_part(line.rstrip("\n").split("\t")) for line in f if line.strip()]
    with open(args.meta) as f:
        meta = json.load(f)
    rows = table_rows(parts)
    ok = not any(part["status"] in ("failed", "timeout") for part in parts)
    report = dict(mode=args.mode, ok=ok, budget_s=args.budget, elapsed_s=args.elapsed, **meta, parts=parts,
                  table=rows)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)

    print(f"\n{meta['device']}, torch {meta['torch']}, mode {args.mode}: {args.elapsed}s of {args.budget}s")
    for part in parts:
        note = f" ({part['reason']})" if part["reason"] else ""
        print(f"  {part['status']:8} {part['name']}{note}")
    if rows:
        print("\n" + format_table(rows))
        print("MFU: TFLOP/s over this GPU's measured torch.mm rate in the run's precision "
              "(bench.py, CUDA only)")
    print(f"\nwritten: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
