"""Edge cases that used to give a wrong value or a wrong uncertainty without a flag, in the
file flow (``predict-files``, ``evaluate``) and the database flow (ingest -> ``infer`` ->
export, API) alike.

A model is trained once (``train-files``) on 30 FGK MILES stars simulated by
``lamost_sim.py``; everything is then measured on spectra of *other* stars: 10 held-out FGK
stars and 6 stars hotter than 7,500 K, two spectra each, with a catalogue that has
- a missing redshift (empty cell) whose file header has one: the header's is used;
- -9999 and NaN redshifts whose files carry no usable header Z either: not estimated;
- a redshift of 3,000 km/s: estimated, flagged suspicious;
- an empty SNRg: no integrated uncertainty, flagged;
- one file whose pixels under a quarter of the Teff-selected pixels are masked.
"""
import contextlib
import csv
import gzip
import io
import json
import shutil

import numpy as np
import pytest
from astropy.io import fits

from conftest import miles_ids
from etl.cli import main
from models.artifact import file_sha256, load_model, sidecar_path
from models.flags import (CATALOGUE_OUT_OF_DOMAIN, FLAG_DESCRIPTIONS, MASKED_SELECTED_PIXELS,
                          NO_USABLE_REDSHIFT, NOT_ESTIMATED, OUT_OF_DISTRIBUTION, SNR_OUT_OF_DOMAIN,
                          SUSPICIOUS_REDSHIFT, UNUSABLE_SPECTRUM)
from models.readers import LAYOUT_DR8_IMAGE, read_spectrum

LABELS = ("teff", "logg", "feh")
SPEED_OF_LIGHT_KMS = 299792.458


def run_cli(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def rewrite(path, header=None, andmask_pixels=None):
    """Rewrite a gzipped DR8 image spectrum with header cards changed (None deletes) and
    and-mask bit 2 (bad pixel) set on ``andmask_pixels``."""
    with fits.open(path) as hdul:
        primary = hdul[0]
        data = primary.data.copy()
        head = primary.header.copy()
    for key, value in (header or {}).items():
        if value is None:
            head.remove(key, ignore_missing=True)
        else:
            head[key] = value
    if andmask_pixels is not None:
        data[3, andmask_pixels] = 2.0
    buffer = io.BytesIO()
    fits.PrimaryHDU(data=data, header=head).writeto(buffer)
    with gzip.open(path, "wb") as handle:
        handle.write(buffer.getvalue())


@pytest.fixture(scope="session")
def edge_model(make_simulated_set, tmp_path_factory):
    miles = make_simulated_set.miles
    fgk = miles_ids(miles, 60)
    train_set = make_simulated_set("edge-train", fgk[0::2], "3x10-20,1x20-80", seed=11)
    path = tmp_path_factory.mktemp("edge-model") / "model.joblib"
    code, _ = run_cli(["train-files", "--catalog", train_set / "lamost_catalog.csv",
                       "--spectra-root", train_set, "--labels", train_set / "apogee_payne.fits",
                       "--out", path, "--ensemble", "2", "--wave-range", "3881,7400", "--degraded-copies", "2",
                       "--lasso-folds", "3", "--calibration-folds", "3", "--max-epochs", "80",
                       "--jobs", "1"])
    assert code == 0
    return path, fgk[1::2][:10], miles_ids(miles, 6, teff=(7500, 20000))


@pytest.fixture(scope="session")
def edge_set(edge_model, make_simulated_set):
    """The held-out spectra with the catalogue edits of the module doc; returns
    (folder, catalogue path, {case: obsid}, hot obsids)."""
    model_path, held_ids, hot_ids = edge_model
    folder = make_simulated_set("edge-held", held_ids + hot_ids, "1x10-20,1x20-80", seed=12)
    rows = read_csv(folder / "lamost_catalog.csv")
    truth = {int(r["obsid"]): r for r in read_csv(folder / "truth.csv")}
    hot = {int(r["obsid"]) for r in rows if int(truth[int(r["obsid"])]["miles_id"]) in hot_ids}
    images = [r for r in rows if int(r["obsid"]) not in hot and float(r["snrg"]) > 10
              and read_spectrum(folder / r["filename"]).layout == LAYOUT_DR8_IMAGE]
    cases = {}
    for case, row in zip(("header_z", "sentinel_z", "nan_z", "suspicious_z", "no_snrg", "masked"),
                         images):
        cases[case] = int(row["obsid"])
        path = folder / row["filename"]
        if case == "header_z":
            row["z"] = ""
        elif case == "sentinel_z":
            row["z"] = "-9999"
            rewrite(path, header={"Z": -9999.0})
        elif case == "nan_z":
            row["z"] = "nan"
            rewrite(path, header={"Z": None})
        elif case == "suspicious_z":
            row["z"] = str(3000.0 / SPEED_OF_LIGHT_KMS)
        elif case == "no_snrg":
            row["snrg"] = ""
        else:
            # a quarter of the Teff-selected pixels (and their neighbours) masked
            model = load_model(model_path)
            rest = model["preprocess"].wavelength[model["model"].estimators_["teff"].support_]
            observed = np.log10(rest[: rest.size // 4] * (1.0 + float(row["z"])))
            spectrum = read_spectrum(path)
            pixel = np.round((observed - np.log10(spectrum.wavelength[0])) / 1e-4).astype(int)
            rewrite(path, andmask_pixels=np.unique(np.concatenate([pixel - 1, pixel, pixel + 1])))
    catalogue = folder / "edge_catalog.csv"
    with open(catalogue, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder, catalogue, cases, hot


@pytest.fixture(scope="session")
def file_estimates(edge_model, edge_set, tmp_path_factory):
    folder, catalogue, _, _ = edge_set
    out = tmp_path_factory.mktemp("edge-predict") / "estimates.csv"
    code, _ = run_cli(["predict-files", "--model", edge_model[0], "--catalog", catalogue,
                       "--spectra-root", folder, "--out", out, "--jobs", "1"])
    assert code == 0
    return {int(row["obsid"]): row for row in read_csv(out)}


def number(value):
    return float(value) if value not in ("", None) else np.nan


# --------------------------------------------------------------------------- file flow

def test_missing_redshift_is_not_estimated_with_its_own_flag(edge_set, file_estimates):
    _, _, cases, _ = edge_set
    for case in ("sentinel_z", "nan_z"):
        row = file_estimates[cases[case]]
        flags = int(row["flags"])
        assert flags & NO_USABLE_REDSHIFT, case
        assert not flags & UNUSABLE_SPECTRUM, case            # the pixels were never judged
        assert "no usable redshift" in row["problem"], case
        assert all(np.isnan(number(row[label])) for label in LABELS), case


def test_missing_catalogue_redshift_falls_back_to_the_header(edge_set, file_estimates):
    """The catalogue's z is used; when it is empty, the file header's Z (README)."""
    _, _, cases, _ = edge_set
    row = file_estimates[cases["header_z"]]
    assert row["problem"] == ""
    assert not int(row["flags"]) & (NO_USABLE_REDSHIFT | UNUSABLE_SPECTRUM)
    assert all(np.isfinite(number(row[label])) for label in LABELS)


def test_suspicious_redshift_is_estimated_and_flagged(edge_set, file_estimates):
    _, _, cases, _ = edge_set
    flagged = [obsid for obsid, row in file_estimates.items() if int(row["flags"]) & SUSPICIOUS_REDSHIFT]
    assert flagged == [cases["suspicious_z"]]           # the simulated stars move < 600 km/s
    assert np.isfinite(number(file_estimates[cases["suspicious_z"]]["teff"]))


def test_missing_snrg_quotes_no_integrated_uncertainty(edge_set, file_estimates):
    """An empty SNRg cell used to read as 0 and take the 5-10 bin's value."""
    _, _, cases, _ = edge_set
    row = file_estimates[cases["no_snrg"]]
    assert int(row["flags"]) & SNR_OUT_OF_DOMAIN
    for label in LABELS:
        assert np.isfinite(number(row[label]))
        assert np.isnan(number(row[label + "_err"]))
    # the others quote one where the model has a calibrated bin (>= 30 calibration spectra:
    # this small test model has them at 10 < SNRg <= 20, where it was trained)
    snrg = {int(r["obsid"]): number(r["snrg"]) for r in read_csv(edge_set[1])}
    inside = [r for r in file_estimates.values() if np.isfinite(number(r["teff"]))
              and 10 < snrg[int(r["obsid"])] <= 20]
    assert inside and all(np.isfinite(number(r["teff_err"])) for r in inside)


def test_masked_selected_pixels_are_flagged(edge_set, file_estimates):
    _, _, cases, _ = edge_set
    flagged = {obsid for obsid, row in file_estimates.items() if int(row["flags"]) & MASKED_SELECTED_PIXELS}
    assert flagged == {cases["masked"]}
    assert np.isfinite(number(file_estimates[cases["masked"]]["teff"]))


def test_hot_stars_are_flagged_by_the_catalogue_and_the_spectrum(edge_set, file_estimates):
    """The networks were trained on 3800-6500 K: hot stars come out inside the domain by
    their predicted Teff, but their LASP subclass (O/B/A) and their spectra give them away."""
    _, _, _, hot = edge_set
    assert len(hot) == 12
    for obsid in hot:
        assert int(file_estimates[obsid]["flags"]) & CATALOGUE_OUT_OF_DOMAIN, obsid
    assert np.median([number(file_estimates[o]["teff"]) for o in hot]) < 6600
    out_of_distribution = np.mean([bool(int(file_estimates[o]["flags"]) & OUT_OF_DISTRIBUTION) for o in hot])
    assert out_of_distribution >= 0.8
    # held-out stars of the training range: with 30 training stars, the few at its edges
    # (a 4000 K giant, a [Fe/H] = -2 star) extrapolate too; on the reference set ~1% do
    held_out = [o for o, r in file_estimates.items() if o not in hot and not int(r["flags"]) & NOT_ESTIMATED]
    assert np.mean([bool(int(file_estimates[o]["flags"]) & OUT_OF_DISTRIBUTION) for o in held_out]) <= 0.35


def test_evaluate_reports_regions_and_flags(edge_model, edge_set, tmp_path):
    folder, catalogue, cases, _ = edge_set
    code, _ = run_cli(["evaluate", "--model", edge_model[0], "--catalog", catalogue,
                       "--spectra-root", folder, "--truth", folder / "truth.csv", "--out", tmp_path,
                       "--jobs", "1"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    regions = report["instrument_regions"]
    assert {name for name, r in regions.items() if r["masked"]} == {"dichroic", "O2 B", "O2 A"}
    assert regions["dichroic"]["range"] == [5700.0, 5900.0] and regions["dichroic"]["pixels"] > 100
    # MILES stops at 7410 A: no pixel of the 3881-7400 A grid in the bands beyond it
    assert regions["H2O 8200"]["pixels"] == 0 and regions["H2O 8200"]["teff"] == 0
    model = load_model(edge_model[0])["model"]
    wavelength = load_model(edge_model[0])["preprocess"].wavelength
    for label in LABELS:
        inside = (wavelength >= 5700) & (wavelength <= 5900)
        assert regions["dichroic"][label] == int(np.sum(model.estimators_[label].support_ & inside))
    flags = report["flags"]
    assert flags[str(NO_USABLE_REDSHIFT)]["n"] == 2 and flags[str(SUSPICIOUS_REDSHIFT)]["n"] == 1
    markdown = (tmp_path / "report.md").read_text()
    assert "## Instrument regions" in markdown and "| dichroic | 5700-5900 | yes |" in markdown
    assert FLAG_DESCRIPTIONS[NO_USABLE_REDSHIFT] in markdown


# --------------------------------------------------------------------------- database flow

@pytest.fixture
def database_estimates(catalogue_engine, edge_model, edge_set, tmp_path):
    """ingest -> register the model -> infer (one batch, in process) on the edge catalogue."""
    from sqlalchemy import select

    from etl import schema
    from etl.inference import infer_obsids, start_inference_run
    from etl.ingest import SpectraIngestOptions, ingest_spectra
    from etl.registry import register_model

    folder, catalogue, _, _ = edge_set
    ingest_spectra(catalogue_engine, SpectraIngestOptions(catalogue=str(catalogue), spectra_root=str(folder),
                                                         show_progress=False), log=io.StringIO())
    model_path = tmp_path / "model.joblib"
    shutil.copy(edge_model[0], model_path)
    shutil.copy(sidecar_path(edge_model[0]), sidecar_path(model_path))    # its SHA-256 record
    artifact = load_model(model_path)
    version = artifact["version"]
    register_model(catalogue_engine, version, model_path, file_sha256(model_path), {}, {})
    with catalogue_engine.connect() as connection:
        obsids = [r[0] for r in connection.execute(select(schema.spectra.c.obsid))]
    run_id = start_inference_run(catalogue_engine, version, {})
    infer_obsids(catalogue_engine, artifact, version, obsids, run_id)
    with catalogue_engine.connect() as connection:
        estimates = {r.obsid: r for r in connection.execute(
            select(schema.estimates).where(schema.estimates.c.model_version == version))}
        failures = {r.obsid: r for r in connection.execute(select(schema.estimate_failures))}
    return catalogue_engine, version, estimates, failures


def test_database_flow_gives_the_file_flow_result(edge_set, file_estimates, database_estimates):
    """Same spectra, same model: the same estimates, the same flags, and the spectra without
    a usable redshift are failures with the reason predict-files gives (never z = 0)."""
    _, _, cases, _ = edge_set
    _, _, estimates, failures = database_estimates
    for case in ("sentinel_z", "nan_z"):
        obsid = cases[case]
        assert obsid not in estimates
        assert failures[obsid].stage == "preprocess"
        assert failures[obsid].reason == file_estimates[obsid]["problem"]
    assert set(failures) == {cases["sentinel_z"], cases["nan_z"]}
    assert set(estimates) == {o for o, r in file_estimates.items() if np.isfinite(number(r["teff"]))}
    for obsid, row in estimates.items():
        file_row = file_estimates[obsid]
        assert row.flags == int(file_row["flags"]), obsid
        assert row.teff == pytest.approx(number(file_row["teff"]), rel=1e-6)
        if obsid == cases["no_snrg"]:
            assert row.teff_err is None and row.logg_err is None and row.feh_err is None
        elif np.isnan(number(file_row["teff_err"])):           # a bin the model did not calibrate
            assert row.teff_err is None
        else:
            assert row.teff_err == pytest.approx(number(file_row["teff_err"]), rel=1e-6)


def test_flag_meanings_reach_the_export_and_the_api(database_estimates, tmp_path):
    from astropy.io.votable import parse as votable_parse

    from etl.export import export_catalogue
    from etl.settings import Settings
    from service.app import create_app

    engine, version, _, _ = database_estimates
    export_catalogue(engine, tmp_path / "catalogue.vot", "votable", model_version=version)
    field = votable_parse(str(tmp_path / "catalogue.vot")).get_first_table().get_field_by_id("flags")
    votable = "".join(field.description.split())           # the writer wraps lines, even at hyphens
    document = create_app(Settings(database_url=str(engine.url.render_as_string(False))),
                          engine=engine).test_client().get("/openapi.json").get_json()
    flags_parameter = json.dumps(document)
    for text in FLAG_DESCRIPTIONS.values():
        assert "".join(text.split()) in votable, text
        assert text in flags_parameter, text


def test_training_options_set_the_preprocessing(edge_model, tmp_path, capsys):
    """The mask list is on by default and stored in the artifact (so in its preprocessing
    hash); --mask-regions and --continuum change it, an unknown region is refused."""
    from models.preprocess import DEFAULT_MASKED_REGIONS

    config = load_model(edge_model[0])["preprocess"]
    assert config.masked_regions == DEFAULT_MASKED_REGIONS and config.continuum == "single"
    argv = ["train-files", "--catalog", tmp_path / "c.csv", "--spectra-root", tmp_path,
            "--labels", tmp_path / "l.fits", "--out", tmp_path / "m.joblib"]
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv] + ["--mask-regions", "dichroic,O3"])
    assert str(exit_info.value.code).startswith("--mask-regions: unknown instrument region 'O3'")
    with pytest.raises(SystemExit):
        main([str(a) for a in argv] + ["--continuum", "spline"])
    assert "invalid choice: 'spline'" in capsys.readouterr().err


def test_redshift_rule_is_one_function():
    """The catalogue z, else the header's Z; never 0 for a missing value (the spectrum page
    uses the same function as the pipeline)."""
    from models.flags import redshift_flags
    from models.pipeline import redshift_to_use

    catalogue = np.array([0.002, -9999.0, np.nan, np.nan, -2.0])
    header = np.array([0.005, 0.001, 0.0003, np.nan, np.nan])
    z = redshift_to_use(catalogue, header)
    np.testing.assert_array_equal(z[:3], [0.002, 0.001, 0.0003])
    assert np.all(redshift_flags(z[3:]) & NO_USABLE_REDSHIFT)


def test_suspicious_redshifts_and_other_classes_do_not_train():
    """train-files trained on every matched spectrum, a GALAXY or a |c z| = 1200 km/s one
    included (found by review); both training commands now leave them out."""
    from models.flags import SUSPICIOUS_REDSHIFT
    from models.pipeline import FeatureSet, unfit_for_training

    n = 4
    feature_set = FeatureSet(np.ones((n, 3), dtype=np.float32), np.ones(n), {},
                             np.zeros((n, 3), dtype=bool),
                             np.array([0, SUSPICIOUS_REDSHIFT, 0, 0], dtype=np.int64), {},
                             np.zeros(n), 0.5)
    unfit, counts = unfit_for_training(feature_set, ["STAR", "STAR", " galaxy", "star"])
    assert unfit.tolist() == [False, True, True, False]
    assert counts == {"suspicious_redshift": 1, "not_star": 1}
    assert unfit_for_training(feature_set)[0].tolist() == [False, True, False, False]
