"""Smoke runs of the file-based commands: ``lamost-vac train-files`` and ``predict-files``.

A small LAMOST-like set is simulated once per session from real MILES stars with
``../shared/tools/lamost_sim.py`` (60 stars of 3800-6500 K, three spectra at 10 < SNRg <= 20
and one at 20-80 each), a model is trained on it through the CLI entry point and used to
predict the catalogue with one truncated spectrum file and one non-STAR row added.
"""
import contextlib
import csv
import io
import json
import subprocess

import numpy as np
import pytest

from conftest import miles_ids
from etl.cli import build_parser, main
from models.artifact import load_model
from models.calibration import snr_bin_index
from models.flags import NOT_A_STAR, UNUSABLE_SPECTRUM
from models.lasso_mlpnet import LABELS

N_STARS = 40
ENSEMBLE = 2
CORRUPT_OBSID = 999000001
GALAXY_OBSID = 999000002


def _subcommand_paths(parser, prefix=()):
    """Every (sub)command of the parser tree, as tuples of names."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub, action
                yield from _subcommand_paths(sub, prefix + (name,))


def _run_cli(argv):
    """``etl.cli.main(argv)`` with its stdout captured; returns (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- help

def test_top_level_help_from_the_console_script():
    result = subprocess.run(["lamost-vac", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: lamost-vac" in result.stdout
    assert "LASSO-MLPNet" in result.stdout
    for command in ("train-files", "predict-files"):
        assert command in result.stdout


def test_every_subcommand_help_exits_zero_and_describes_itself(capsys):
    commands = list(_subcommand_paths(build_parser()))
    names = {path[0] for path, _, _ in commands}
    assert {"train-files", "predict-files"} <= names
    for path, sub, action in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0, path
        text = capsys.readouterr().out
        assert f"usage: lamost-vac {' '.join(path)}" in text, path
        summary = next((c.help for c in action._choices_actions if c.dest == path[-1]), None)
        assert summary or sub.description, f"{' '.join(path)} has neither a description nor a help line"
        if len(path) == 1:
            # a command's own --help says what it does (nested ones, e.g. 'db upgrade', may
            # rely on the one-line summary their parent's --help lists)
            description = sub.description or summary
            assert " ".join(description.split())[:40] in " ".join(text.split()), path


def test_train_and_predict_document_their_options(capsys):
    for command, options in (("train-files", ["--catalog", "--spectra-root", "--labels", "--out",
                                              "--snr-range", "--wave-range", "--ensemble"]),
                             ("predict-files", ["--model", "--catalog", "--spectra-root", "--out"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for option in options:
            assert option in text, (command, option)


# --------------------------------------------------------------------------- bad options

@pytest.mark.parametrize("option", ["--snr-range", "--wave-range"])
@pytest.mark.parametrize("value, reason", [("ten,20", "two numbers"), ("10", "two numbers"),
                                           ("10,20,30", "two numbers"), ("20,10", "LOW must be below HIGH"),
                                           ("15,15", "LOW must be below HIGH")])
def test_bad_range_exits_with_a_message_naming_the_option(tmp_path, option, value, reason):
    argv = ["train-files", "--catalog", str(tmp_path / "cat.csv"), "--spectra-root", str(tmp_path),
            "--labels", str(tmp_path / "labels.fits"), "--out", str(tmp_path / "m.joblib"), option, value]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert message.startswith(option), message
    assert reason in message and value in message
    assert not (tmp_path / "m.joblib").exists()


@pytest.mark.parametrize("value, says", [("-1", "must be at least 0, got -1"),
                                         ("nan", "expected a finite number, got 'nan'")])
def test_a_negative_despike_sigma_is_refused(tmp_path, value, says, capsys):
    argv = ["train-files", "--catalog", str(tmp_path / "cat.csv"), "--spectra-root", str(tmp_path),
            "--labels", str(tmp_path / "labels.fits"), "--out", str(tmp_path / "m.joblib"),
            "--despike-sigma", value]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument --despike-sigma: {says}" in capsys.readouterr().err


# --------------------------------------------------------------------------- simulated set

@pytest.fixture(scope="session")
def sim_set(make_simulated_set):
    # stars inside the method's valid domain, so that every one trains (--label-domain)
    ids = miles_ids(make_simulated_set.miles, N_STARS, feh=(-1.5, 2.0))
    return make_simulated_set("sim-cli", ids, "3x10-20,1x20-80", seed=4)


@pytest.fixture(scope="session")
def trained_model(sim_set, tmp_path_factory):
    model_path = tmp_path_factory.mktemp("model") / "model.joblib"
    code, stdout = _run_cli([
        "train-files", "--catalog", str(sim_set / "lamost_catalog.csv"), "--spectra-root", str(sim_set),
        "--labels", str(sim_set / "apogee_payne.fits"), "--out", str(model_path),
        "--ensemble", str(ENSEMBLE), "--wave-range", "3881,7400", "--input-noise", "0.8",
        "--calibration-folds", "3", "--lasso-folds", "3", "--degraded-copies", "3", "--jobs", "1"])
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    return model_path, summary


@pytest.fixture(scope="session")
def predictions(sim_set, trained_model, tmp_path_factory):
    """predict-files on the catalogue plus a truncated copy of one file and a GALAXY row."""
    rows = _read_csv(sim_set / "lamost_catalog.csv")
    work = tmp_path_factory.mktemp("predict")
    corrupt_rel = "spectra/broken/spec-59999-BROKEN_sp01-001.fits.gz"
    (sim_set / corrupt_rel).parent.mkdir(parents=True)
    data = (sim_set / rows[0]["filename"]).read_bytes()
    (sim_set / corrupt_rel).write_bytes(data[: len(data) // 2])
    extra = [dict(rows[0], obsid=str(CORRUPT_OBSID), filename=corrupt_rel),
             dict(rows[1], obsid=str(GALAXY_OBSID), **{"class": "GALAXY"})]
    catalogue = work / "catalogue.csv"
    with open(catalogue, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + extra)
    out = work / "estimates.csv"
    code, _ = _run_cli(["predict-files", "--model", str(trained_model[0]), "--catalog", str(catalogue),
                        "--spectra-root", str(sim_set), "--out", str(out)])
    assert code == 0
    return rows + extra, _read_csv(out)


def test_train_files_writes_an_artifact_honouring_the_options(sim_set, trained_model):
    model_path, summary = trained_model
    artifact = load_model(model_path)
    assert summary["version"] == artifact["version"]
    assert summary["n_train"] == artifact["training"]["n_spectra"] > 50
    config = artifact["preprocess"]
    assert (config.wave_min, config.wave_max) == (3881.0, 7400.0)
    training = artifact["training"]
    assert training["snr_range"] == [5.0, 80.0]                 # the default: the valid range
    assert 5.0 < training["snrg_min"] and training["snrg_max"] <= 80.0
    model = artifact["model"]
    for estimator in model.estimators_.values():
        assert len(estimator.members_) == ENSEMBLE
        assert {m.input_noise for m in estimator.members_} == {0.8}
        assert estimator.selector_.cv == 3
    # every star trained the model; cross-fitted predictions of all of their spectra (every
    # SNRg) calibrated the uncertainties: 3 x 40 at 10-20, the 40 at 20-80 split in two bins
    assert training["calibration"] == "cross-fitting" and training["calibration_folds"] == 3
    assert training["n_stars"] == N_STARS
    assert model.calibration_counts_[1] >= 110 and sum(model.calibration_counts_) >= 155
    assert artifact["metrics"]["cross_fitted"]["teff"]["all"]["n"] == 4 * N_STARS
    assert len(model.training_obsids_) == training["n_spectra"]
    # degraded copies: 3 of each star's SNRg 20-80 spectrum, S/N 5-20, beside (not counted
    # among) the observed training spectra
    assert training["degraded_copies"] == {"per_spectrum": 3, "snr_range": [5.0, 20.0], "n_spectra": 3 * N_STARS}
    for label in LABELS:
        assert model.error_models_[label].counts_.tolist() == model.calibration_counts_.tolist()
        assert model.repeat_scales_[label].n_pairs_ > 30


def test_predict_files_estimates_every_spectrum_once(sim_set, trained_model, predictions):
    catalogue, estimates = predictions
    obsids = [int(row["obsid"]) for row in estimates]
    assert sorted(obsids) == sorted(int(row["obsid"]) for row in catalogue)
    assert len(set(obsids)) == len(obsids)
    columns = set(estimates[0])
    for label in ("teff", "logg", "feh"):
        assert {label, label + "_err", label + "_err_model"} <= columns
        assert label + "_err_int" not in columns
    assert {"obsid", "flags", "problem", "model_version"} <= columns

    version = load_model(trained_model[0])["version"]
    assert {row["model_version"] for row in estimates} == {version}
    for row in estimates:
        assert str(int(row["flags"])) == row["flags"]               # an integer, not "0.0"

    readable = [row for row in estimates if int(row["obsid"]) not in (CORRUPT_OBSID, GALAXY_OBSID)]
    assert len(readable) == 4 * N_STARS
    model = load_model(trained_model[0])["model"]
    snrg_of = {int(row["obsid"]): float(row["snrg"]) for row in catalogue}
    for row in readable:
        values = [float(row[k + s]) for k in ("teff", "logg", "feh") for s in ("", "_err_model")]
        assert np.all(np.isfinite(values)), row
        # the calibrated uncertainty exists exactly in the SNRg bins with >= 30 calibration spectra
        which = snr_bin_index([snrg_of[int(row["obsid"])]], model.snr_bins_)[0]
        calibrated = which >= 0 and model.calibration_counts_[which] >= 30
        for k in ("teff", "logg", "feh"):
            assert np.isfinite(float(row[k + "_err"])) == calibrated, row
        assert row["problem"] == ""
        assert not int(row["flags"]) & (UNUSABLE_SPECTRUM | NOT_A_STAR)


def test_predictions_follow_the_true_labels(sim_set, predictions):
    """Most stars were in training: a sanity check of the whole chain (cross-match, labels,
    preprocessing, model), far from a benchmark."""
    _, estimates = predictions
    truth = {int(row["obsid"]): row for row in _read_csv(sim_set / "truth.csv")}
    rows = [row for row in estimates if int(row["obsid"]) in truth]
    for label in ("teff", "logg", "feh"):
        predicted = np.array([float(row[label]) for row in rows])
        true = np.array([float(truth[int(row["obsid"])][label]) for row in rows])
        mae = np.mean(np.abs(predicted - true))
        assert mae < 0.6 * np.mean(np.abs(true - true.mean())), label


def test_corrupt_file_is_reported_and_the_others_still_estimated(predictions):
    _, estimates = predictions
    by_obsid = {int(row["obsid"]): row for row in estimates}
    broken = by_obsid[CORRUPT_OBSID]
    assert broken["problem"] != ""
    assert any(word in broken["problem"].lower() for word in ("truncated", "gzip", "corrupt", "short"))
    assert np.isnan(float(broken["teff"])) and np.isnan(float(broken["feh"]))
    assert int(broken["flags"]) & UNUSABLE_SPECTRUM
    galaxy = by_obsid[GALAXY_OBSID]
    assert "STAR" in galaxy["problem"]
    assert np.isnan(float(galaxy["teff"]))
    assert int(galaxy["flags"]) & NOT_A_STAR and not int(galaxy["flags"]) & UNUSABLE_SPECTRUM
    finite = sum(np.isfinite(float(row["teff"])) for row in estimates)
    assert finite == len(estimates) - 2


def test_predict_files_refuses_an_incompatible_model(sim_set, tmp_path, capsys):
    bogus = tmp_path / "bogus.joblib"
    bogus.write_text("not a model")
    # a clear one-line error naming the file, and a non-zero exit, not a traceback
    code = main(["predict-files", "--model", str(bogus), "--catalog", str(sim_set / "lamost_catalog.csv"),
                 "--spectra-root", str(sim_set), "--out", str(tmp_path / "out.csv")])
    message = capsys.readouterr().err
    assert code == 2
    assert "no sidecar" in message and str(bogus) in message     # not even unpickled
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("column, cell, message", [
    ("z", "unknown", "column 'z' holds text that is not a number in data row(s) 2 (unknown)"),
    ("snrg", "n/a", "column 'snrg' holds text that is not a number in data row(s) 2 (n/a)"),
    ("obsid", "", "column 'obsid' has no integer obsid in data row(s) 2"),
    ("obsid", "12x", "column 'obsid' has no integer obsid in data row(s) 2 (12x)"),
])
def test_a_bad_catalogue_cell_is_named_by_file_column_and_row(sim_set, trained_model, tmp_path,
                                                              capsys, column, cell, message):
    """A word in z was 'could not convert string to float', naming nothing; an empty
    obsid was estimated as obsid 0 (found by review)."""
    rows = _read_csv(sim_set / "lamost_catalog.csv")[:3]
    rows[1][column] = cell
    catalogue = tmp_path / "catalogue.csv"
    with open(catalogue, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code = main(["predict-files", "--model", str(trained_model[0]), "--catalog", str(catalogue),
                 "--spectra-root", str(sim_set), "--out", str(tmp_path / "out.csv")])
    error = capsys.readouterr().err
    assert code != 0 and f"{catalogue}: {message}" in error, error
    assert "Traceback" not in error and not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("suffix", ["fits", "vot"])
def test_predict_files_fits_and_votable_carry_units_ucds_and_flag_meanings(
        sim_set, trained_model, tmp_path, suffix):
    """They had none, unlike export's (found by review); the validators pass them."""
    from astropy.io import fits
    from astropy.io.votable import parse

    from etl import schema
    from release_validators import assert_valid_fits, assert_valid_votable

    rows = _read_csv(sim_set / "lamost_catalog.csv")[:4]
    catalogue = tmp_path / "catalogue.csv"
    with open(catalogue, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / f"estimates.{suffix}"
    code, _ = _run_cli(["predict-files", "--model", str(trained_model[0]), "--catalog",
                        str(catalogue), "--spectra-root", str(sim_set), "--out", str(out)])
    assert code == 0
    expected = {name: schema.column_info("estimates", name)
                for name in ("teff", "logg_err", "feh_err_model", "flags")}
    if suffix == "fits":
        assert_valid_fits(out)
        header = fits.getheader(out, 1)
        found = {header[f"TTYPE{i}"]: i for i in range(1, header["TFIELDS"] + 1)}
        for name, described in expected.items():
            i = found[name]
            assert header.get(f"TUNIT{i}") == described.unit and \
                header[f"TUCD{i}"] == described.ucd, name
        assert header[f"TCOMM{found['problem']}"].startswith("why the spectrum")
    else:
        assert_valid_votable(out)
        fields = {f.name: f for f in parse(str(out)).get_first_table().fields}
        for name, described in expected.items():
            # (astropy wraps a DESCRIPTION's lines, at hyphens too)
            assert fields[name].ucd == described.ucd and "".join(
                fields[name].description.split()) == "".join(described.description.split()), name
        assert fields["teff"].unit == "K"
        assert "64 = c z beyond" in " ".join(fields["flags"].description.split())


def test_blank_cells_of_a_text_column_are_missing_not_an_error():
    """A text column with blanks (or masked cells hiding text) named no bad row, raising
    an error with an empty row list (found by review)."""
    from astropy.table import MaskedColumn

    from etl.filesets import _numbers

    assert np.isnan(_numbers(np.array(["0.001", ""]), "c.csv", "z")).tolist() == [False, True]
    assert np.isnan(_numbers(MaskedColumn(["0.1", "x"], mask=[0, 1]), "c.csv", "z")).tolist() == \
        [False, True]
