"""Training rows follow the method's valid domain (``--label-domain``, etl/label_domain.py).

Unit checks of the option's parsing and of the row selection, then one ``train-files`` run
on a simulated set holding hot and metal-poor stars besides in-domain ones: the artifact
records the domain and was trained on in-domain labels only.
"""
import contextlib
import io

import numpy as np
import pytest

from conftest import miles_ids
from etl.cli import main
from etl.label_domain import (DEFAULT_LABEL_DOMAIN, format_label_domain, in_label_domain,
                              parse_label_domain, select_label_domain)
from etl.training import TrainOptions
from models.artifact import load_model
from models.report import describe_label_domain


def test_default_domain_is_the_methods_valid_domain():
    assert parse_label_domain(DEFAULT_LABEL_DOMAIN) == {"teff": (3500.0, 6500.0), "feh": (-1.5, None)}
    assert TrainOptions().label_domain == {"teff": (3500.0, 6500.0), "feh": (-1.5, None)}
    assert parse_label_domain("none") == {}
    assert parse_label_domain(" logg=:4.5 , TEFF=4000:5000") == {"logg": (None, 4.5),
                                                                  "teff": (4000.0, 5000.0)}
    assert format_label_domain(parse_label_domain(DEFAULT_LABEL_DOMAIN)) == DEFAULT_LABEL_DOMAIN


@pytest.mark.parametrize("text, reason", [
    ("teff", "LABEL=LOW:HIGH"), ("teff=3500", "LABEL=LOW:HIGH"), ("", "LABEL=LOW:HIGH"),
    ("mass=1:2", "unknown label 'mass'"), ("teff=hot:6500", "'hot' is not a number"),
    ("teff=6500:3500", "LOW must be below HIGH"), ("feh=:", "neither a lower nor an upper"),
    ("teff=1:2,teff=3:4", "given twice"), ("teff=nan:6500", "not finite")])
def test_bad_domain_is_refused_naming_the_option(text, reason):
    with pytest.raises(SystemExit) as exit_info:
        parse_label_domain(text)
    message = str(exit_info.value.code)
    assert message.startswith("--label-domain:"), message
    assert reason in message, message


def test_selection_keeps_exactly_the_in_domain_rows():
    labels = {"teff": np.array([3499.9, 3500.0, 5000.0, 6500.0, 6500.1, 5000.0, 5000.0, np.nan, 5000.0]),
              "logg": np.full(9, 4.0),
              "feh": np.array([0.0, 0.0, -1.5, 0.3, 0.0, -1.51, np.nan, 0.0, 0.5])}
    domain = parse_label_domain(DEFAULT_LABEL_DOMAIN)
    expected = np.array([False, True, True, True, False, False, False, False, True])
    assert np.array_equal(in_label_domain(labels, domain), expected)
    mask, record = select_label_domain(labels, domain)
    assert np.array_equal(mask, expected)
    assert record == {"label_domain": {"teff": [3500.0, 6500.0], "feh": [-1.5, None]},
                      "n_outside_label_domain": 5}
    assert describe_label_domain(record) == ("labels inside 3500 <= teff <= 6500, feh >= -1.5 "
                                             "(5 matched spectra outside left out)")
    assert in_label_domain(labels, {}).all()          # 'none': every row


def _train_files(sim, out, *extra):
    argv = ["train-files", "--catalog", str(sim / "lamost_catalog.csv"), "--spectra-root", str(sim),
            "--labels", str(sim / "apogee_payne.fits"), "--out", str(out), "--ensemble", "1",
            "--wave-range", "3881,7400", "--max-epochs", "30", "--degraded-copies", "2", "--lasso-folds", "3", "--jobs", "1",
            *extra]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def mixed_domain_set(make_simulated_set):
    miles = make_simulated_set.miles
    inside = miles_ids(miles, 16, teff=(3800.0, 6400.0), feh=(-1.0, 0.5))
    hot = miles_ids(miles, 3, teff=(7000.0, 12000.0), feh=(-1.0, 0.5))
    metal_poor = miles_ids(miles, 3, teff=(4500.0, 6400.0), feh=(-5.0, -1.8))
    return make_simulated_set("sim-domain", sorted(set(inside + hot + metal_poor)),
                              "3x10-20", seed=7, decoys=0)


def test_train_files_trains_inside_the_domain_and_records_it(mixed_domain_set, tmp_path, capsys):
    code, stdout = _train_files(mixed_domain_set, tmp_path / "m.joblib")
    assert code == 0
    training = load_model(tmp_path / "m.joblib")["training"]
    assert training["label_domain"] == {"teff": [3500.0, 6500.0], "feh": [-1.5, None]}
    assert training["n_outside_label_domain"] >= 6 * 3 * 0.5     # the hot and metal-poor stars' spectra
    ranges = training["label_ranges"]
    assert 3500.0 <= ranges["teff"][0] and ranges["teff"][1] <= 6500.0
    assert ranges["feh"][0] >= -1.5
    assert "training on labels inside 3500 <= teff <= 6500, feh >= -1.5" in capsys.readouterr().err


def test_bad_label_domain_on_the_command_line_writes_nothing(mixed_domain_set, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _train_files(mixed_domain_set, tmp_path / "m.joblib", "--label-domain", "teff=6500:3500")
    assert str(exit_info.value.code).startswith("--label-domain:")
    assert not (tmp_path / "m.joblib").exists()
