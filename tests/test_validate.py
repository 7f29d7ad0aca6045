"""``lamost-vac validate`` on a subset of the real LAMOST spectra, and its statistics.

A small model (30 FGK MILES stars, 3 simulated spectra each, 2 networks per label) is
trained once; validate then runs on the first 15 files of each real folder.
"""
import csv
import json

import numpy as np
import pytest

from conftest import miles_ids
from etl.cli import main
from models.lasso_mlpnet import LABELS
from models.readers import read_meta
from models.validation import pairwise_z, repeat_scatter, scatter_summary, z_summary
from models.validation_report import OUTCOMES, PLOT_FILES, spectrum_key

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LIMIT = 15
FOLDERS = ("dr1-plate-B6212", "dr7-plate-HD103621N361936B01", "dr8-repeats")


@pytest.fixture(scope="session")
def real_dir(shared_dir):
    path = shared_dir / "data" / "lamost-real"
    if not all((path / folder).is_dir() for folder in FOLDERS):
        pytest.skip(f"real LAMOST spectra not found under {path}")
    return path


@pytest.fixture(scope="session")
def small_model(make_simulated_set, tmp_path_factory):
    ids = miles_ids(make_simulated_set.miles, 30, teff=(4000, 6500), logg=(0, 5.5), feh=(-1.0, 0.5))
    sim = make_simulated_set("validate_fgk", ids, "2x10-20,1x20-80", seed=7)
    path = tmp_path_factory.mktemp("validate_model") / "model.joblib"
    assert main(["train-files", "--catalog", str(sim / "lamost_catalog.csv"), "--spectra-root", str(sim),
                 "--labels", str(sim / "apogee_payne.fits"), "--out", str(path), "--ensemble", "2",
                 "--wave-range", "3881,7400", "--lasso-folds", "3", "--calibration-folds", "3",
                 "--jobs", "2"]) == 0
    return path


@pytest.fixture(scope="session")
def subset_report(small_model, real_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("validate_report")
    assert main(["validate", "--model", str(small_model), "--real-dir", str(real_dir), "--out", str(out),
                 "--jobs", "2", "--limit-per-folder", str(LIMIT)]) == 0
    return out, json.loads((out / "report.json").read_text())


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_file_of_the_subset_has_an_outcome_and_reason(subset_report, small_model):
    out, report = subset_report
    from models.artifact import load_model
    from models.calibration import snr_bin_index

    model = load_model(small_model)["model"]
    calibrated_bins = {k for k, n in enumerate(model.calibration_counts_) if n >= 30}
    rows = read_rows(out / "estimates.csv")
    assert len(rows) == 3 * LIMIT
    counts = report["counts"]
    assert set(counts) == {*FOLDERS, "all"}
    for folder in FOLDERS:
        assert counts[folder]["total"] == LIMIT
        assert sum(counts[folder][o] for o in OUTCOMES) == LIMIT
    assert counts["all"]["total"] == 3 * LIMIT
    for row in rows:
        assert row["outcome"] in OUTCOMES
        estimated = row["outcome"] in ("estimated", "estimated_flagged")
        assert np.isfinite(float(row["teff"])) == estimated, row
        if row["outcome"] != "estimated":
            assert row["reason"], row          # everything not cleanly estimated says why
        if estimated:
            # the model uncertainty always; the calibrated one only in the SNRg bins that had
            # 30 calibration spectra (real spectra reach SNRg 375: mostly outside)
            in_calibrated_bin = int(snr_bin_index([float(row["snrg"])], model.snr_bins_)[0]) in calibrated_bins
            for label in LABELS:
                assert np.isfinite(float(row[label + "_err_model"])) and float(row[label + "_err_model"]) > 0
                assert np.isfinite(float(row[label + "_err"])) == in_calibrated_bin, row


def test_outcome_follows_the_header(subset_report, real_dir):
    out, _ = subset_report
    for row in read_rows(out / "estimates.csv"):
        meta = read_meta(real_dir / row["folder"] / row["file"])
        if meta["class"] != "STAR":
            assert row["outcome"] == "not_a_star" and "not STAR" in row["reason"]
        elif meta["snrg"] <= 2:
            assert row["outcome"] == "low_snr"
        else:
            assert row["outcome"] not in ("not_a_star", "low_snr")


def test_galaxies_and_near_zero_snr_are_flagged_not_estimated(small_model, real_dir, tmp_path):
    # the dr7 plate's galaxies, unknowns and SNRg ~ 1 stars, found from the headers
    folder = real_dir / FOLDERS[1]
    odd = [p for p in sorted(folder.glob("*.fits*"))
           if read_meta(p)["class"] != "STAR" or read_meta(p)["snrg"] <= 2][:4]
    assert len(odd) == 4
    sub = tmp_path / "real" / "odd"
    sub.mkdir(parents=True)
    for path in odd:
        (sub / path.name).symlink_to(path)
    (sub / "spec-broken.fits").write_bytes(b"SIMPLE  = not really a FITS file")
    out = tmp_path / "report"
    assert main(["validate", "--model", str(small_model), "--real-dir", str(tmp_path / "real"),
                 "--out", str(out), "--jobs", "1"]) == 0
    rows = {r["file"]: r for r in read_rows(out / "estimates.csv")}
    assert rows["spec-broken.fits"]["outcome"] == "unreadable"
    assert "FITS" in rows["spec-broken.fits"]["reason"]
    for path in odd:
        assert rows[path.name]["outcome"] in ("not_a_star", "low_snr")
        assert not np.isfinite(float(rows[path.name]["teff"]))      # not estimated
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["all"]["total"] == 5
    assert report["repeatability"]["n_stars"] == 0 and report["lasp"]["n_estimated"] == 0
    assert "unreadable" in (out / "report.md").read_text()


def test_repeatability_section(subset_report, real_dir):
    out, report = subset_report
    rep = report["repeatability"]
    # the subset takes whole repeat groups first, so the 15 dr8 files give several stars
    assert rep["n_files_in_groups"] == LIMIT
    assert rep["n_stars"] >= 5
    for label in LABELS:
        r = rep["labels"][label]
        assert r["n_stars"] == rep["n_stars"]
        assert r["median_scatter"] >= 0
        assert r["z_model"]["n"] >= rep["n_stars"]
        assert r["z_model"]["std"] > 0 and r["z_model"]["robust_std"] > 0
        # the calibrated _err is NaN above the calibrated SNRg range: fewer pairs, maybe none
        assert r["z_calibrated"]["n"] <= r["z_model"]["n"]
        if r["z_calibrated"]["n"]:
            assert r["z_calibrated"]["std"] > 0
    groups = {spectrum_key(r["combined_file"]): r["GroupID"]
              for r in read_rows(real_dir / "dr8-repeats" / "repeat_groups.csv")}
    rows = [r for r in read_rows(out / "estimates.csv") if r["folder"] == "dr8-repeats"]
    assert all(int(r["repeat_group"]) == int(float(groups[spectrum_key(r["file"])])) for r in rows)


def test_lasp_section_and_report_files(subset_report):
    out, report = subset_report
    lasp = report["lasp"]
    assert lasp["n_with_lasp_row"] == LIMIT           # LASP-matched DR1 files come first
    assert lasp["n_estimated"] >= LIMIT - 2
    for label in LABELS:
        s = lasp["all"][label]["all"]
        assert s["n"] == lasp["n_estimated"]
        for key in ("mae", "mu", "sigma"):
            assert np.isfinite(s[key])
    rows = [r for r in read_rows(out / "estimates.csv") if np.isfinite(float(r["teff_lasp"]))]
    assert len(rows) == LIMIT and all(r["folder"] == FOLDERS[0] for r in rows)
    text = (out / "report.md").read_text()
    for heading in ("## Robustness", "## Repeatability", "## Agreement with LASP", "Kiel diagram",
                    "Mean offsets ours - LASP", "flux calibration", "3881-7400", "lamost-vac validate"):
        assert heading in text, heading
    for name in PLOT_FILES.values():
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, name
        assert f"]({name})" in text


def test_limit_must_be_positive(small_model, real_dir, tmp_path, capsys):
    assert main(["validate", "--model", str(small_model), "--real-dir", str(real_dir),
                 "--out", str(tmp_path), "--limit-per-folder", "0"]) == 2
    assert "--limit-per-folder" in capsys.readouterr().err


# -- statistics --------------------------------------------------------------------------
def test_honest_uncertainties_give_unit_z():
    rng = np.random.default_rng(1)
    n_stars, per_star = 400, 3
    groups = np.repeat(np.arange(n_stars), per_star)
    truth = np.repeat(rng.uniform(4000, 6500, n_stars), per_star)
    err = rng.uniform(20, 120, groups.size)
    values = truth + rng.normal(0, err)
    z, owner = pairwise_z(values, err, groups)
    assert z.size == n_stars * 3 and len(owner) == z.size
    s = z_summary(z)
    assert 0.9 < s["std"] < 1.1 and 0.9 < s["robust_std"] < 1.1
    assert 0.63 < s["within_1"] < 0.73
    assert 1.8 < z_summary(pairwise_z(values, err / 2, groups)[0])["std"] < 2.2   # too small errors


def test_repeat_scatter_skips_missing_and_singletons():
    values = np.array([1.0, 3.0, np.nan, 5.0, 7.0, 9.0, 2.0])
    groups = [1, 1, 2, 2, 3, 3, 4]          # group 2 has one finite value, group 4 one spectrum
    snrg = np.array([10, 30, 50, 50, 100, 100, 20.0])
    errors = np.array([1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 1.0])
    s = repeat_scatter(values, groups, snrg, errors=errors)
    assert s["group"] == [1, 3]
    assert np.allclose(s["std"], [np.sqrt(2), np.sqrt(2)])
    assert np.allclose(s["mean_snrg"], [20, 100]) and np.allclose(s["rms_err"], [1, 2])
    z, owner = pairwise_z(values, errors, groups)
    assert np.allclose(np.abs(z), [2 / np.sqrt(2), 2 / np.sqrt(8)]) and owner == [1, 3]
    summary = scatter_summary(s, (0, 50, np.inf))
    assert summary["all"]["n_groups"] == 2 and summary["0-50"]["n_groups"] == 1
    assert summary["50-inf"]["median_rms_err"] == 2
    assert z_summary([])["n"] == 0 and z_summary([])["std"] is None
