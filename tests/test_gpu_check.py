"""tools/gpu_check.sh on a machine without CUDA: it runs to the end, reports the CUDA parts as skipped, runs
the same bench.py invocations at a tiny size on the CPU (--compile traced by dynamo with the eager backend),
exits 0 and writes the JSON; and tools/gpu_check_report.py's reading of failed, timed-out and skipped parts.

The full script takes ~50 s of one CPU core; where CUDA is present it would run the whole GPU suite instead,
so those tests skip there (run `bash tools/gpu_check.sh` itself).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_bench import REQUIRED

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check_report  # noqa: E402
CUDA_PARTS = [f"bench {model} {mode}" for model in ("XL/2", "B/2") for mode in ("tf32", "bf16", "compile")]
SMOKE_PARTS = [f"cpu-smoke bench T/2 {mode}" for mode in ("tf32", "bf16", "compile")]
no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the GPU suite")


def gpu_check(tmp_path, *argv):
    out = tmp_path / "check.json"
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--out", str(out), *argv], cwd=ROOT, text=True,
                            capture_output=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return result, json.loads(out.read_text()) if out.exists() else None


@no_cuda_only
def test_cpu_run_skips_cuda_parts_and_smokes_the_bench(tmp_path):
    result, report = gpu_check(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["mode"] == "cpu-smoke" and report["ok"] is True and report["cuda"] is False
    parts = {part["name"]: part for part in report["parts"]}
    assert list(parts) == ["tests/test_cuda.py", *CUDA_PARTS, *SMOKE_PARTS]
    tests = parts["tests/test_cuda.py"]
    assert tests["status"] == "skipped"
    assert tests["counts"]["skipped"] > 0 and not tests["counts"].get("passed")
    for name in CUDA_PARTS:
        assert parts[name]["status"] == "skipped" and parts[name]["reason"] == "no CUDA", name
    for name in SMOKE_PARTS:
        assert parts[name]["status"] == "passed", parts[name]
        bench = parts[name]["result"]
        for key in REQUIRED:
            assert math.isfinite(bench[key]) and bench[key] > 0, (name, key)
        assert bench["device"] == "cpu" and bench["compile"] == name.endswith("compile")
    assert "baseline_iter_ms" in parts["cpu-smoke bench T/2 tf32"]["result"]
    rows = {row["part"]: row for row in report["table"]}
    assert list(rows) == [SMOKE_PARTS[0], SMOKE_PARTS[0] + " baseline", *SMOKE_PARTS[1:]]
    assert all(row["img_per_s"] > 0 and row["mfu"] is None for row in rows.values())  # mfu is CUDA's
    peak_mb = parts[SMOKE_PARTS[0]]["result"]["peak_mem_mb"]
    assert rows[SMOKE_PARTS[0]]["peak_mem_gib"] == pytest.approx(peak_mb / 1024)
    printed = [line.split(maxsplit=1) for line in result.stdout.splitlines() if line.strip()]
    for name in ["tests/test_cuda.py", *CUDA_PARTS]:  # the printed summary says what was skipped
        assert any(words[0] == "skipped" and words[1].startswith(name) for words in printed), name
    assert (tmp_path / "check_logs" / "parts.tsv").exists()


def test_spent_budget_skips_every_part_and_says_so(tmp_path):
    result, report = gpu_check(tmp_path, "--budget", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["budget_s"] == 0 and report["table"] == []
    spent = [part for part in report["parts"] if part["reason"].startswith("total budget spent")]
    assert spent and all(part["status"] == "skipped" and part["seconds"] == 0 for part in spent)
    assert {part["name"] for part in spent} >= {"tests/test_cuda.py"}


def write_parts(tmp_path, lines):
    (tmp_path / "parts.tsv").write_text("".join("\t".join(map(str, line)) + "\n" for line in lines))
    (tmp_path / "meta.json").write_text(json.dumps(dict(torch="x", cuda=True, device="GPU", gpus=1)))
    return ["--parts", str(tmp_path / "parts.tsv"), "--meta", str(tmp_path / "meta.json"),
            "--out", str(tmp_path / "out.json"), "--budget", "480", "--elapsed", "400", "--mode", "gpu"]


def test_report_fails_on_failed_and_timed_out_parts(tmp_path, capsys):
    (tmp_path / "tests.log").write_text("....F\nFAILED tests/test_cuda.py::x\n1 failed, 4 passed in 9.1s\n")
    (tmp_path / "bench.log").write_text('{"iter_ms": 100.0, "img_per_s": 320.0, "tflops": 500.0, "mfu": 0.5, '
                                        '"peak_mem_mb": 2048.0, "warmup_s": 3.0}\n')
    (tmp_path / "crash.log").write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")
    argv = write_parts(tmp_path, [
        ("tests/test_cuda.py", "tests", "failed", 9, 220, "exit status 1", tmp_path / "tests.log"),
        ("bench XL/2 tf32", "bench", "passed", 50, 75, "", tmp_path / "bench.log"),
        ("bench XL/2 bf16", "bench", "passed", 5, 50, "", tmp_path / "crash.log"),
        ("bench XL/2 compile", "bench", "timeout", 150, 150, "stopped after its 150s budget",
         tmp_path / "crash.log"),
        ("bench B/2 compile", "bench", "skipped", 0, 150, "total budget spent (3s left of 480s)", "")])
    assert gpu_check_report.main(argv) == 1
    report = json.loads((tmp_path / "out.json").read_text())
    parts = {part["name"]: part for part in report["parts"]}
    assert report["ok"] is False
    assert parts["tests/test_cuda.py"]["counts"] == {"failed": 1, "passed": 4}
    assert "FAILED tests/test_cuda.py::x" in parts["tests/test_cuda.py"]["log_tail"]
    assert parts["bench XL/2 bf16"]["status"] == "failed"  # exit 0 but no JSON line
    assert "out of memory" in parts["bench XL/2 compile"]["log_tail"]
    assert report["table"] == [dict(part="bench XL/2 tf32", img_per_s=320.0, tflops=500.0, mfu=0.5,
                                    peak_mem_gib=2.0, iter_ms=100.0, warmup_s=3.0)]
    printed = capsys.readouterr().out
    assert "50.0%" in printed and "total budget spent" in printed
