"""Regression test on real images: a short run of the Fashion-MNIST laptop preset learns class-conditional
samples.

Needs the real Fashion-MNIST IDX files (Debian: `apt-get install dataset-fashion-mnist`, which .ci/run does);
skips with the reason where they are absent. A judge (quality.py) is trained on the real training set, then
`python train.py --data fashion-mnist` runs STEPS steps and judges its EMA samples at the end.

The thresholds, measured on a 2-core x86-64 CPU (the test pinned to one core, a training run on the
other): after STEPS = 600 steps the preset's samples scored accuracy 0.427, a Frechet ratio of 0.200,
precision 0.708 and recall 0.141, with a judge of A_real 0.901; the whole test took 170 s. THRESHOLD = 0.3 is
3x chance (0.1) and 0.13 below the measurement, yet a generator that ignores its class or draws noise scores
about 0.1. RECALL_FLOOR = 0.04 is 3.5x below the measurement and over 10x what the paper's N(0, I) noise
reached at this point (0.002-0.003 at steps 500-750 of a 30-minute run: one garment per class), so a preset
that collapses again fails.
"""

import json
import os
import subprocess
import sys

import pytest

import checkpoint
import data
import quality

STEPS = 600
THRESHOLD = 0.3
RECALL_FLOOR = 0.04
FASHION_MNIST = [folder for folder in data.IDX_DEFAULT_DIRS["fashion-mnist"]
                 if os.path.exists(os.path.join(folder, "train-images-idx3-ubyte.gz"))]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ABSENT = ("the real Fashion-MNIST files are absent: apt-get install dataset-fashion-mnist, or put the four "
          "IDX files in data/fashion-mnist")
pytestmark = pytest.mark.skipif(not FASHION_MNIST, reason=ABSENT)


def test_fashion_mnist_preset_learns_the_classes(tmp_path):
    judge_path = str(tmp_path / "judge.pt")
    judge = quality.train_judge("fashion-mnist", FASHION_MNIST[0], 28, steps=600, log=lambda message: None)
    assert judge["real_accuracy"] > 0.85  # the judge itself must be trustworthy before it judges
    checkpoint.save(judge, judge_path)
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--data", "fashion-mnist",
               "--max-steps", str(STEPS), "--judge", judge_path, "--judge-every", str(STEPS),
               "--out-dir", str(tmp_path / "run")]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    with open(tmp_path / "run" / "log.jsonl") as f:
        judged = [record for record in map(json.loads, f) if "judge_accuracy" in record]
    assert [r["step"] for r in judged] == [0, STEPS]
    untrained, trained = judged
    print(f"step {STEPS}: accuracy {trained['judge_accuracy']:.3f}, "
          f"Frechet ratio {trained['judge_fd_ratio']:.3f}, precision {trained['judge_precision']:.3f}, "
          f"recall {trained['judge_recall']:.3f}; judge A_real {judge['real_accuracy']:.3f}, real against "
          f"real: "
          f"precision {judge['pr_ceiling'][0]:.3f}, recall {judge['pr_ceiling'][1]:.3f}")
    assert untrained["judge_accuracy"] == pytest.approx(0.1)  # mid-gray samples: one class for all
    assert trained["judge_accuracy"] >= THRESHOLD, trained
    assert trained["judge_fd_ratio"] < 0.7, trained
    # The ceiling recall is read against must be what real images score; the preset's one step must not draw
    # one garment per class (the paper's N(0, I) noise reached 0.002 here).
    assert judge["pr_ceiling"][1] > 0.8
    assert trained["judge_recall"] >= RECALL_FLOOR, trained
