"""``lamost-vac evaluate``, the paper's six baselines and the figures.

One small simulated set (40 FGK MILES stars, 3 spectra each) is made and one model with
baselines trained on it per session; ``evaluate`` then runs on 40 other FGK stars with the
truth table and with cross-matched labels, and refuses (or marks) the training stars.
"""
import json

import numpy as np
import pytest
from sklearn.svm import SVR

from conftest import miles_ids
from etl.cli import main
from models.baselines import BASELINE_NAMES, METHOD_NAMES, MODEL_NAME, LassoWeightedSVR
from models.lasso_mlpnet import LABELS
from models.metrics import accuracy_by_snr, snr_bin_names
from models.plots import (accuracy_vs_snr, kiel_diagram, predicted_vs_reference, reliability_diagram,
                          uncertainty_vs_snr)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("predicted_vs_reference.png", "accuracy_vs_snr.png", "uncertainty_vs_snr.png", "reliability.png",
         "kiel_diagram.png")


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is suspiciously small ({len(data)} bytes)"


@pytest.fixture(scope="session")
def fgk_set(make_simulated_set):
    """FGK stars inside the method's domain."""
    ids = miles_ids(make_simulated_set.miles, 40, teff=(4000, 6500), logg=(0, 5.5), feh=(-1.0, 0.5),
                    spread=False)
    return make_simulated_set("fgk", ids, "2x10-20,1x20-80", seed=5)


@pytest.fixture(scope="session")
def heldout_set(make_simulated_set):
    """40 other FGK stars: never seen in training."""
    ids = miles_ids(make_simulated_set.miles, 80, teff=(4000, 6500), logg=(0, 5.5), feh=(-1.0, 0.5),
                    spread=False)[40:]
    return make_simulated_set("fgk-heldout", ids, "2x10-20,1x20-80", seed=6, obsid_start=910000001)


@pytest.fixture(scope="session")
def trained_model(fgk_set, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.joblib"
    assert main(["train-files", "--catalog", str(fgk_set / "lamost_catalog.csv"),
                 "--spectra-root", str(fgk_set / "spectra"), "--labels", str(fgk_set / "apogee_payne.fits"),
                 "--out", str(path), "--ensemble", "2", "--wave-range", "3881,7400", "--jobs", "2", "--degraded-copies", "2",
                 "--lasso-folds", "3", "--calibration-folds", "3",
                 "--baselines"]) == 0
    return path


def run_evaluate(sim_set, model, out, *reference, catalogue=None):
    catalogue = catalogue or sim_set / "lamost_catalog.csv"
    assert main(["evaluate", "--model", str(model), "--catalog", str(catalogue),
                 "--spectra-root", str(sim_set / "spectra"), *reference, "--out", str(out),
                 "--jobs", "2"]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="session")
def truth_report(heldout_set, trained_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_truth")
    return out, run_evaluate(heldout_set, trained_model, out, "--truth", str(heldout_set / "truth.csv"))


def assert_summary_finite(summary):
    assert summary["n"] > 0
    for key in ("mae", "mu", "sigma"):
        assert summary[key] is not None and np.isfinite(summary[key]), summary


# -- evaluate end to end -----------------------------------------------------------------
def test_evaluate_with_truth_reports_every_label_and_bin(truth_report):
    out, report = truth_report
    assert report["counts"]["with_reference"] == 120
    assert report["counts"]["estimated"] == 120
    assert report["snr_bins"] == snr_bin_names()
    for label in LABELS:
        per = report["accuracy"][label]
        assert set(per) == {"all", *snr_bin_names()}
        assert per["all"]["n"] == 120
        assert_summary_finite(per["all"])
        for name in snr_bin_names():
            if per[name]["n"] > 1:
                assert_summary_finite(per[name])
        # simulated at 10-20 and 20-80; the measured SNRg of a few spectra lands just
        # outside (below 10, above 80, the latter in no bin)
        assert per["10-20"]["n"] > 0 and per["40-80"]["n"] + per["20-40"]["n"] > 0
        assert 110 <= sum(per[name]["n"] for name in snr_bin_names()) <= 120
        for name, u in report["uncertainty"][label].items():
            if u["n"]:
                assert u["median_model_err"] > 0
            # the model's calibration counts per bin; fewer than 30 spectra: no _err
            assert u["calibration_spectra"] >= 0
            if u["calibration_spectra"] < 30:
                assert u["median_err"] is None
            elif u["n"]:
                assert u["median_err"] > 0
        # coverage of the calibrated uncertainty, bin by bin (None where _err is NaN)
        for name in snr_bin_names():
            s = per[name]
            assert set(s) >= {"mae", "mu", "sigma", "z_std", "within_1", "within_2"}
            if s["within_1"] is not None:
                assert 0 <= s["within_1"] <= s["within_2"] <= 1 and s["z_std"] > 0
        assert per["10-20"]["within_1"] is not None
    # a real check of the training, not only of the plumbing: Teff within a few hundred K
    assert report["accuracy"]["teff"]["all"]["mae"] < 400


def test_evaluate_comparison_table_has_all_methods(truth_report):
    out, report = truth_report
    assert list(report["comparison"]) == list(METHOD_NAMES)
    for method, accuracy in report["comparison"].items():
        for label in LABELS:
            assert_summary_finite(accuracy[label]["all"])
            assert accuracy[label]["all"]["n"] == 120
    assert report["comparison"][MODEL_NAME] == report["accuracy"]
    seconds = report["baselines"]["fit_seconds"]
    assert set(seconds) == set(LABELS)
    assert all(set(per) == set(BASELINE_NAMES) for per in seconds.values())
    markdown = (out / "report.md").read_text()
    assert "| Method | Teff MAE (K) |" in markdown
    for method in METHOD_NAMES:
        assert f"| {method} | " in markdown
    assert "| all | 120 |" in markdown
    assert "training stars (by obsid" in markdown and "left out" in markdown
    assert "| SNRg | N | Teff z std | Teff within 1 err |" in markdown


def test_evaluate_writes_plots_and_estimates(truth_report):
    out, report = truth_report
    for name in PLOTS:
        assert_png(out / name)
        assert f"]({name})" in (out / "report.md").read_text()
    from astropy.table import Table
    estimates = Table.read(out / "estimates.csv", format="ascii.csv")
    assert len(estimates) == 120
    for column in ("obsid", "teff", "teff_err", "teff_err_model", "teff_ref", "logg_ref", "feh_ref",
                   "snrg", "flags", "model_version", "in_training"):
        assert column in estimates.colnames
    assert not np.any(np.asarray(estimates["in_training"]).astype(str) == "True")
    baselines = Table.read(out / "baseline_estimates.csv", format="ascii.csv")
    assert {"teff_lr", "logg_lasso_svr", "feh_et"} <= set(baselines.colnames)
    assert np.isfinite(np.asarray(baselines["teff_rf"], dtype=float)).all()


def test_evaluate_with_cross_matched_labels(heldout_set, trained_model, truth_report, tmp_path):
    report = run_evaluate(heldout_set, trained_model, tmp_path, "--labels", str(heldout_set / "apogee_payne.fits"))
    assert report["reference"]["kind"] == "labels"
    assert report["counts"]["with_reference"] == 120    # every spectrum's own star, not a neighbour
    _, by_truth = truth_report
    for label in LABELS:
        # the label catalogue holds the same true labels: identical statistics
        assert report["accuracy"][label]["all"]["mae"] == pytest.approx(by_truth["accuracy"][label]["all"]["mae"], rel=1e-4)
    assert list(report["comparison"]) == list(METHOD_NAMES)
    for name in PLOTS:
        assert_png(tmp_path / name)


def test_evaluate_without_baselines_and_no_matches(heldout_set, trained_model, tmp_path):
    import joblib

    from models.artifact import write_sidecar

    payload = joblib.load(trained_model)
    payload["extra"] = {}
    bare = tmp_path / "bare.joblib"
    joblib.dump(payload, bare)
    write_sidecar(bare, payload)        # a rewritten artifact needs a sidecar for its new bytes
    # a third of the catalogue is enough here and keeps the test short
    lines = (heldout_set / "lamost_catalog.csv").read_text().splitlines()
    part = tmp_path / "part.csv"
    part.write_text("\n".join(lines[:41]) + "\n")
    report = run_evaluate(heldout_set, bare, tmp_path / "report", "--truth", str(heldout_set / "truth.csv"),
                          catalogue=part)
    assert report["counts"]["with_reference"] == 40
    assert report["comparison"] is None and report["baselines"] is None
    assert "No baselines" in (tmp_path / "report" / "report.md").read_text()

    empty_truth = tmp_path / "truth.csv"
    empty_truth.write_text("obsid,teff,logg,feh\n1,5000,4.5,0.0\n")
    with pytest.raises(SystemExit, match="no catalogue spectrum has a reference"):
        run_evaluate(heldout_set, bare, tmp_path / "none", "--truth", str(empty_truth), catalogue=part)


def test_evaluate_refuses_or_marks_the_training_stars(fgk_set, trained_model, tmp_path):
    """The artifact records its training spectra and stars: evaluating them is refused, and
    --include-training keeps them but marks them and says so."""
    from astropy.table import Table

    catalogue = Table.read(fgk_set / "lamost_catalog.csv", format="ascii.csv")
    training_rows = (catalogue["snrg"] > 10) & (catalogue["snrg"] <= 20)     # what trained the model
    n_training = int(training_rows.sum())
    assert 70 < n_training < 120
    part = tmp_path / "training_rows.csv"
    catalogue[training_rows].write(part, format="ascii.csv", overwrite=True)
    with pytest.raises(SystemExit, match=f"all {n_training} spectra .* training stars"):
        run_evaluate(fgk_set, trained_model, tmp_path / "by_obsid", "--truth", str(fgk_set / "truth.csv"),
                     catalogue=part)
    # the stars' other spectra (20 < SNRg <= 80), which did not train the model, are the
    # training stars' too: recognised by position with a truth table, by star id with labels
    for reference in (["--truth", str(fgk_set / "truth.csv")], ["--labels", str(fgk_set / "apogee_payne.fits")]):
        with pytest.raises(SystemExit, match="all 120 spectra .* training stars"):
            run_evaluate(fgk_set, trained_model, tmp_path / "by_star", *reference)

    report = run_evaluate(fgk_set, trained_model, tmp_path / "marked", "--truth", str(fgk_set / "truth.csv"),
                          "--include-training")
    assert report["counts"]["training_left_out"] == 0 and report["counts"]["evaluated"] == 120
    assert report["note"].startswith("**Not a validation:** 120 of these spectra")
    assert "Not a validation" in (tmp_path / "marked" / "report.md").read_text()
    marked = Table.read(tmp_path / "marked" / "estimates.csv", format="ascii.csv")
    assert all(str(v) == "True" for v in marked["in_training"])


# -- baselines ---------------------------------------------------------------------------
def test_baselines_use_the_lasso_selected_pixels(trained_model):
    import joblib

    payload = joblib.load(trained_model)
    baselines, model = payload["extra"]["baselines"], payload["model"]
    n_pixels = model.scaler_.mean_.size
    for label in LABELS:
        np.testing.assert_array_equal(baselines.supports_[label], model.estimators_[label].support_)
        assert set(baselines.estimators_[label]) == set(BASELINE_NAMES)
    assert baselines.log_target_ == {"teff": True, "logg": False, "feh": False}
    assert baselines.n_train_ == payload["training"]["n_spectra"]
    X = np.random.default_rng(0).normal(1.0, 0.05, (4, n_pixels))
    X[2] = np.nan
    predictions = baselines.predict(X)
    assert set(predictions) == set(LABELS)
    for label in LABELS:
        for name in BASELINE_NAMES:
            assert np.isnan(predictions[label][name][2])
            assert np.isfinite(predictions[label][name][[0, 1, 3]]).all()
    assert np.all(predictions["teff"]["LR"][[0, 1, 3]] > 100)     # back in K, not log10 K


def test_lasso_weighted_svr_is_svr_on_weighted_features():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 3))
    y = X[:, 0] - 0.5 * X[:, 1] + 0.1 * rng.normal(size=30)
    weights = np.array([-2.0, 0.5, 0.0])          # signs ignored, zero-weight pixel ignored
    model = LassoWeightedSVR(weights=weights).fit(X, y)
    np.testing.assert_array_equal(model.weights_, [2.0, 0.5, 0.0])
    reference = SVR(kernel="rbf", gamma="scale").fit(X * [2.0, 0.5, 0.0], y)
    X_new = rng.normal(size=(5, 3))
    np.testing.assert_allclose(model.predict(X_new), reference.predict(X_new * [2.0, 0.5, 0.0]))
    changed = X_new.copy()
    changed[:, 2] += 100.0
    np.testing.assert_allclose(model.predict(changed), model.predict(X_new))
    # gamma="scale": only the relative weights matter
    scaled = LassoWeightedSVR(weights=10 * weights).fit(X, y)
    np.testing.assert_allclose(scaled.predict(X_new), model.predict(X_new), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError):
        model.predict(X_new[:, :2])
    with pytest.raises(ValueError):
        LassoWeightedSVR().fit(X, y)


# -- plots -------------------------------------------------------------------------------
@pytest.fixture
def synthetic_estimates():
    rng = np.random.default_rng(2)
    n = 120
    reference = {"teff": rng.uniform(4000, 6500, n), "logg": rng.uniform(1, 5, n), "feh": rng.uniform(-1.5, 0.4, n)}
    snrg = rng.uniform(5.5, 80, n)
    noise = {"teff": 100, "logg": 0.2, "feh": 0.1}
    predicted = {k: v + rng.normal(0, noise[k] * 15 / snrg) for k, v in reference.items()}
    predicted["teff"][3] = np.nan                       # an unestimated spectrum is skipped
    errors = {k: noise[k] * 10 / snrg for k in LABELS}
    return predicted, reference, snrg, errors


def test_plots_write_pngs(synthetic_estimates, tmp_path):
    predicted, reference, snrg, errors = synthetic_estimates
    accuracy = accuracy_by_snr(predicted, reference, snrg)
    other = accuracy_by_snr({k: v + 0.01 for k, v in predicted.items()}, reference, snrg)
    calibrated = {k: 1.5 * v for k, v in errors.items()}
    residuals = {k: predicted[k] - reference[k] for k in LABELS}
    paths = [
        predicted_vs_reference(str(tmp_path / "a.png"), predicted, reference, snrg),
        accuracy_vs_snr(str(tmp_path / "b.png"), accuracy, methods={"LR": other}),
        uncertainty_vs_snr(str(tmp_path / "c.png"), snrg, errors, calibrated),
        reliability_diagram(str(tmp_path / "e.png"), residuals, calibrated, snrg),
        kiel_diagram(str(tmp_path / "sub" / "d.png"), predicted["teff"], predicted["logg"], predicted["feh"],
                     reference=reference),
    ]
    for path in paths:
        assert_png(tmp_path / path)


def test_figure_axes_and_labels(synthetic_estimates, tmp_path, monkeypatch):
    import models.plots as plots

    predicted, reference, snrg, errors = synthetic_estimates
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: figures.append(figure) or path)
    plots.kiel_diagram(str(tmp_path / "k.png"), predicted["teff"], predicted["logg"], predicted["feh"])
    ax = figures[0].axes[0]
    assert ax.get_xlim()[0] > ax.get_xlim()[1]        # hot stars on the left
    assert ax.get_ylim()[0] > ax.get_ylim()[1]        # giants at the top
    assert "(K)" in ax.get_xlabel() and "(dex)" in ax.get_ylabel()

    # without SNRg the scatter is drawn in one colour and no colour bar is added
    plots.predicted_vs_reference(str(tmp_path / "p.png"), predicted, reference)
    assert len(figures[1].axes) == 2 * len(LABELS)
    assert [ax.get_xlabel() for ax in figures[1].axes[:2]] == [
        "reference " + plots.AXIS_LABELS["teff"], r"$\Delta$" + plots.SHORT_NAMES["teff"] + " (estimate - reference, K)"]


def test_reliability_diagram_follows_the_diagonal_for_honest_errors(tmp_path, monkeypatch):
    import models.plots as plots

    rng = np.random.default_rng(3)
    n = 4000
    snrg = rng.uniform(5.5, 80, n)
    errors = {k: rng.uniform(0.5, 2.0, n) for k in LABELS}
    honest = {k: errors[k] * rng.standard_normal(n) for k in LABELS}
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: figures.append(figure) or path)
    plots.reliability_diagram(str(tmp_path / "r.png"), honest, errors, snrg)
    plots.reliability_diagram(str(tmp_path / "r2.png"), honest, {k: v / 2 for k, v in errors.items()}, snrg)
    for figure, expected_gap in zip(figures, ("honest", "too small")):
        ax = figure.axes[0]
        curves = [line for line in ax.get_lines() if line.get_label().startswith("SNRg")]
        assert [line.get_label().split(" (")[0] for line in curves] == [f"SNRg {n}" for n in snr_bin_names()]
        for line in curves:
            nominal, observed = line.get_data()
            gap = np.max(np.abs(observed - nominal))
            if expected_gap == "honest":
                assert gap < 0.07
            else:                                  # errors too small: coverage far below nominal
                assert np.all(observed <= nominal + 0.03) and gap > 0.25
