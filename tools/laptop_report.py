"""Draw what a laptop run learnt: quality against training minutes, and sample grids at chosen minutes.

    python tools/laptop_report.py out/afm out/gan --names "AFM" "lambda_ot = 0" --minutes 2 10 30 \\
        --curve docs/laptop_curve.png --grids docs/laptop_grids.png
    python tools/laptop_report.py out/afm fm:1 fm:4 --names "AFM" "FM, 1 step" "FM, 4 steps" --minutes 10 30
    python tools/laptop_report.py --compose side.png afm.png fm4.png --names "AFM, 1 step" "FM, 4 steps"

Reads each run's log.jsonl (the judge_* records of train.py's or flow_matching.py's --judge-every) and its
samples_*.png grids. A flow_matching.py run judges at several step counts: DIR:K takes its records at K steps.
The curve has three panels against minutes of training: sample class accuracy / A_real, the Frechet distance
in the judge's features / the untrained generator's (log scale), and recall. The grids are the EMA sample
grids written nearest to each chosen minute, one column per minute, one row per run (a flow_matching.py run
draws them at its --nfe). Prints the table of the numbers behind both pictures. --compose sets PNG files (e.g.
`sample.py --out` grids) side by side under their names.
"""

import argparse
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def new_drawing(size):
    """A white image and its drawing context, in pillow's scalable default font (its bitmap font all but drops
    the spaces between words)."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.font = ImageFont.load_default(size=12)
    return image, draw


def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def split_spec(spec):
    """'DIR' -> (DIR, None); 'DIR:K' -> (DIR, K): a flow_matching.py run's records at K sampling steps."""
    folder, _, steps = spec.rpartition(":")
    return (folder, int(steps)) if folder and steps.isdigit() else (spec, None)


def judged(log, steps):
    """The judge records of a log, those at `steps` sampling steps where given."""
    return [r for r in log if "judge_accuracy" in r and (steps is None or r.get("nfe") == steps)]


def at_minute(records, minute):
    """The judged record nearest to `minute`."""
    return min(records, key=lambda r: abs(r["minutes"] - minute))


def draw_panel(draw, box, runs, key, title, log_scale):
    left, top, right, bottom = box
    values = [r[key] for records in runs for r in records]
    lo, hi = ((min(values), max(values)) if not log_scale
              else (math.log10(min(values)), math.log10(max(values))))
    hi = hi if hi > lo else lo + 1
    x_max = max(r["minutes"] for records in runs for r in records)

    def point(record):
        value = math.log10(record[key]) if log_scale else record[key]
        return (left + (right - left) * record["minutes"] / x_max,
                bottom - (bottom - top) * (value - lo) / (hi - lo))

    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left, top - 16), title, fill=(0, 0, 0))
    for fraction in (0, 0.5, 1):
        label = lo + fraction * (hi - lo)
        label = f"{10 ** label:.3g}" if log_scale else f"{label:.2f}"
        draw.text((left - 40, bottom - fraction * (bottom - top) - 6), label, fill=(0, 0, 0))
    for minute in range(0, int(x_max) + 1, 5):
        x = left + (right - left) * minute / x_max
        draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
        draw.text((x - 6, bottom + 6), str(minute), fill=(0, 0, 0))
    draw.text(((left + right) / 2 - 40, bottom + 20), "training minutes", fill=(0, 0, 0))
    for i, records in enumerate(runs):
        draw.line([point(r) for r in records], fill=COLOURS[i % len(COLOURS)], width=2)


def draw_curves(runs, names, path):
    image, draw = new_drawing((1350, 360))  # three panels of 370 x 250 px
    draw_panel(draw, (60, 30, 430, 280), runs, "judge_accuracy_ratio",
               "sample class accuracy / A_real (higher is better)", log_scale=False)
    draw_panel(draw, (510, 30, 880, 280), runs, "judge_fd_ratio",
               "Frechet distance / untrained generator's (log)", log_scale=True)
    draw_panel(draw, (960, 30, 1330, 280), [[r for r in records if "judge_recall" in r] for records in runs],
               "judge_recall", "recall (higher is better)", log_scale=False)
    for i, name in enumerate(names):  # the legend, once, below the panels
        x, y, colour = 60 + 160 * (i % 8), 323 + 18 * (i // 8), COLOURS[i % len(COLOURS)]
        draw.line([(x, y + 7), (x + 20, y + 7)], fill=colour, width=2)
        draw.text((x + 26, y), name, fill=colour)
    image.save(path)


def nearest_grid(run, log, minute):
    """The samples_<step>.png written nearest to `minute`, and the minute it was written at."""
    minutes_at = {r["step"]: r["minutes"] for r in log if "minutes" in r}
    steps = [int(name[8:-4]) for name in os.listdir(run)
             if name.startswith("samples_") and name.endswith(".png")]
    step = min((s for s in steps if s in minutes_at), key=lambda s: abs(minutes_at[s] - minute))
    return Image.open(os.path.join(run, f"samples_{step:08d}.png")).convert("RGB"), minutes_at[step], step


def draw_table(rows, path, gap=12, label=18):
    """Rows of (caption, image) pairs, each image under its caption; 28-px samples are drawn 2x, pixel for
    pixel."""
    scale = max(1, 400 // rows[0][0][1].size[0])
    rows = [[(caption, picture.resize((picture.size[0] * scale, picture.size[1] * scale), Image.NEAREST))
             for caption, picture in row] for row in rows]
    width = max(picture.size[0] for row in rows for _, picture in row)
    height = max(picture.size[1] for row in rows for _, picture in row)
    image, draw = new_drawing((max(map(len, rows)) * (width + gap), len(rows) * (height + label + gap)))
    for r, row in enumerate(rows):
        for column, (caption, picture) in enumerate(row):
            x, y = column * (width + gap), r * (height + label + gap)
            draw.text((x, y + 2), caption, fill=(0, 0, 0))
            image.paste(picture, (x, y + label))
    image.save(path)


def draw_grids(runs, logs, names, minutes, path):
    """One row per run, one column per chosen minute: the grid written nearest to it."""
    draw_table([[(f"{name}: {minute:.1f} min (step {step})", grid)
                 for grid, minute, step in (nearest_grid(run, log, m) for m in minutes)]
                for run, log, name in zip(runs, logs, names)], path)


def compose(paths, names, out):
    """PNG files in one row, each under its name."""
    draw_table([[(name, Image.open(path).convert("RGB")) for name, path in zip(names, paths)]], out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="train.py or flow_matching.py --out-dir folders, DIR:K for a "
                   "flow_matching.py run at K steps; with --compose, PNG files")
    p.add_argument("--names", nargs="+", help="one legend name per run (default: the folder names)")
    p.add_argument("--minutes", nargs="+", type=float, default=[2, 10, 30])
    p.add_argument("--curve", default="laptop_curve.png")
    p.add_argument("--grids", default="laptop_grids.png")
    p.add_argument("--compose", help="set the PNG files given as runs side by side in this file, and stop")
    args = p.parse_args()
    names = args.names or [os.path.basename(os.path.normpath(run)) for run in args.runs]
    if args.compose:
        compose(args.runs, names, args.compose)
        print(f"wrote {args.compose}")
        return
    specs = [split_spec(spec) for spec in args.runs]
    logs = [read_log(folder) for folder, _ in specs]
    runs = [judged(log, steps) for log, (_, steps) in zip(logs, specs)]
    draw_curves(runs, names, args.curve)
    draw_grids([folder for folder, _ in specs], logs, names, args.minutes, args.grids)
    print("| run | minutes | step | accuracy | / A_real | Frechet distance | / untrained | precision | "
          "recall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, records in zip(names, runs):
        for minute in args.minutes:
            r = {"judge_precision": float("nan"), "judge_recall": float("nan"), **at_minute(records, minute)}
            print(f"| {name} | {r['minutes']:.1f} | {r['step']} | {r['judge_accuracy']:.3f} | "
                  f"{r['judge_accuracy_ratio']:.3f} | {r['judge_fd']:.1f} | {r['judge_fd_ratio']:.3f} | "
                  f"{r['judge_precision']:.3f} | {r['judge_recall']:.3f} |")
        for level in (0.5, 0.8, 0.9):
            first = next((r for r in records if r["judge_accuracy_ratio"] >= level), None)
            when = f"{first['minutes']:.1f} min (step {first['step']})" if first else "not reached"
            print(f"{name}: sample accuracy {level:.0%} of A_real first at {when}")
    print(f"wrote {args.curve} and {args.grids}")


if __name__ == "__main__":
    main()
