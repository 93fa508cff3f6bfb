"""End-to-end check of the main job: examples/demo.py --quick (train FP32 + W4A4, plot,
pack, save, reload into a fresh model, compare predictions)."""

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def test_demo_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--out", str(tmp_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    png = tmp_path / "demo_curves.png"
    assert png.is_file() and png.stat().st_size > 0, output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "predictions on" in output and "are IDENTICAL" in output, output
    agreement = re.search(r"top-1 agreement with the packed model ([0-9.]+)%", output)
    assert agreement is not None and float(agreement.group(1)) >= 99.9, output  # SPEC 8
    assert "NOT IDENTICAL" not in output
    # The final table is printed last.
    last = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1]
    assert last.startswith("| W4A4 q4conv deployed"), output
