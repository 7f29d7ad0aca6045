"""The benchmark scripts stay runnable: each imports the project and explains itself.

The measurements themselves take minutes and belong in ``bench/``, not in the suite; this
catches a script left behind by a change of the code it calls (imports, option names).
"""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_help(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout.lower()
