"""The one-command demo (issue 6) and the production compose file."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from etl.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMOST_VAC_")}   # embedded default
    result = subprocess.run(
        [sys.executable, "-m", "etl.cli", "demo", "--no-serve", "--out", str(out), "--stars", "60",
         "--ensemble", "2"], cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_demo_exports_a_sensible_catalogue(demo_run):
    out, _ = demo_run
    truth = {int(r["obsid"]): r for r in csv.DictReader(open(out / "truth.csv"))}
    rows = list(csv.DictReader(open(out / "catalogue.csv")))
    assert sorted(int(r["obsid"]) for r in rows) == sorted(truth)        # every spectrum, once
    teff = np.array([float(r["teff"]) for r in rows])
    true_teff = np.array([float(truth[int(r["obsid"])]["teff"]) for r in rows])
    feh = np.array([float(r["feh"]) for r in rows])
    true_feh = np.array([float(truth[int(r["obsid"])]["feh"]) for r in rows])
    assert np.isfinite(teff).all() and np.isfinite(feh).all()
    # the analytic stars span 3800-6800 K and [Fe/H] -2..0.4: estimates must track them far
    # better than a constant would
    assert np.mean(np.abs(teff - true_teff)) < 0.5 * np.mean(np.abs(true_teff - true_teff.mean()))
    assert np.mean(np.abs(feh - true_feh)) < 0.5 * np.mean(np.abs(true_feh - true_feh.mean()))
    assert all(float(r["teff_err_model"]) > 0 for r in rows)
    # the calibrated uncertainty is left empty only in SNRg bins with fewer than 30
    # cross-fitted spectra (the sample's few spectra below SNRg 10)
    with_err = [r for r in rows if r["teff_err"] not in ("", "nan", "--")]
    assert all(float(r["teff_err"]) > 0 for r in with_err)
    assert len(with_err) > 0.8 * len(rows)
    assert all(float(r["snrg"]) <= 10 for r in rows if r not in with_err)
    assert (out / "catalogue.vot").read_text().lstrip().startswith("<?xml")


def test_demo_writes_the_report_and_plots(demo_run):
    out, _ = demo_run
    for name in ("predicted_vs_reference", "accuracy_vs_snr", "uncertainty_vs_snr", "kiel_diagram"):
        data = (out / "report" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    assert "MAE" in (out / "report" / "report.md").read_text()


def test_demo_prints_queries_that_return_rows(demo_run):
    _, result = demo_run
    urls = [line for line in result.stdout.splitlines() if "http://127.0.0.1" in line]
    assert len(urls) == 2 and any("/scs?" in u for u in urls) and any("/api/v1/estimates?" in u for u in urls)
    for line in urls:
        rows = int(line.split("(")[-1].split(" rows")[0])
        assert rows > 0, line


def test_compose_file_runs_every_part_with_the_same_settings():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"db", "redis", "worker", "beat", "api"} <= set(services)
    assert "q3c" in " ".join(services["db"]["command"].split())
    env_keys = [set(services[name]["environment"]) for name in ("worker", "beat", "api")]
    for keys in env_keys:
        assert {"LAMOST_VAC_DATABASE_URL", "LAMOST_VAC_BROKER_URL", "LAMOST_VAC_MODEL_DIR"} <= keys
    parser = build_parser()
    for name in ("worker", "beat"):
        command = services[name]["command"]
        assert command[0] == "lamost-vac"
        parser.parse_args(command[1:])                 # a real subcommand with valid options
    assert "service.app:create_app()" in services["api"]["command"]
    assert (REPO / "Dockerfile").is_file()
