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


def test_scale_bench_measures_the_child_peak_not_its_own():
    """Linux carries a process's largest RSS over fork and exec, so wait4's ru_maxrss of a
    child forked from a large bench is the bench's size; the export's peak must be its own."""
    sys.path.insert(0, str(BENCH.parent))
    from bench.scale import peak_rss_while_running

    ballast = bytearray(600 * 1024 * 1024)          # this process: > 600 MB resident
    ballast[::4096] = b"x" * len(ballast[::4096])
    child = subprocess.Popen([sys.executable, "-c",
                              "import time; a = bytearray(200 * 2**20); a[::4096] = b'x' * len(a[::4096]); "
                              "time.sleep(0.5)"])
    peak_mib = peak_rss_while_running(child) / 1024
    assert child.returncode == 0
    assert 200 < peak_mib < 500, peak_mib
    del ballast


def test_cone_latency_is_measured_warm_and_interleaved():
    """Every method reads every centre once untimed before any timing, and no method is
    always the first to read a centre (the first pays for the cold pages)."""
    sys.path.insert(0, str(BENCH.parent))
    from bench.api import interleaved_latency

    calls = []

    def method(name, answer):
        def run(ra, dec, radius_deg):
            calls.append((name, (ra, dec), radius_deg))
            return answer
        return run

    methods = {"a": method("a", 5), "b": method("b", 7), "broken": method("broken", None)}
    centres = [(float(i), -float(i)) for i in range(6)]
    result = interleaved_latency(methods, centres, 0.25, rounds=2)
    warm_up, timed = calls[:3 * len(centres)], calls[3 * len(centres):]
    assert sorted((n, c) for n, c, _ in warm_up) == sorted(
        (n, c) for n in methods for c in centres)
    assert len(timed) == 3 * len(centres) * 2 and {r for _, _, r in calls} == {0.25}
    firsts = {timed[i][0] for i in range(0, len(timed), 3)}
    assert firsts == set(methods)
    assert (result["a"]["n"], result["a"]["rows_mean"], result["a"]["errors"]) == (12, 5, 0)
    assert result["broken"]["errors"] == 12 and result["broken"]["rows_mean"] is None
