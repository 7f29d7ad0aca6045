"""Every file the project releases validates (issue 11, item 14): the catalogue written by
``lamost-vac export`` and the API's VOTable and FITS answers (/scs, /api/v1/estimates)
pass STILTS votlint and fitsverify, on SQLite and PostgreSQL."""
import datetime as dt
from xml.etree import ElementTree

import pytest
from sqlalchemy import insert, update

from etl import schema
from etl.cli import main as cli_main
from release_validators import assert_valid_fits, assert_valid_votable
from conftest import CURRENT, NOW, service_settings

# Two preprocessing configurations among the current estimates: their hashes (64
# characters each) do not fit on one FITS card.
SECOND_HASH = "q" * 64
EMPTY_MODEL = "v3.0-empty"


@pytest.fixture(scope="module")
def release_db(service_db):
    """The service's test catalogue, plus a second preprocessing hash and a model without
    estimates."""
    url, reader_url, _ = service_db
    from etl import db

    engine = db.make_engine(url)
    with engine.begin() as connection:
        connection.execute(update(schema.estimates)
                           .where(schema.estimates.c.model_version == CURRENT,
                                  schema.estimates.c.obsid % 3 == 0)
                           .values(preprocessing_hash=SECOND_HASH))
        connection.execute(insert(schema.models).values(
            version=EMPTY_MODEL, created_at=NOW - dt.timedelta(days=60), status="retired",
            artifact_path="/models/empty.joblib", artifact_sha256="b" * 64,
            code_version="0.1.0", training_set={}, metrics={}))
    engine.dispose()
    return url, reader_url


def export(url, fmt, path, *options):
    """``lamost-vac export`` in this process; its messages must hold no warning."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["export", "--format", fmt, "--out", str(path), "--url", url,
                         *options])
    assert code == 0, err.getvalue()
    assert "WARNING" not in err.getvalue().upper(), err.getvalue()
    return path


@pytest.mark.parametrize("model", [CURRENT, EMPTY_MODEL])
def test_exported_votable_and_fits_validate(release_db, tmp_path, model):
    from astropy.io import fits
    from astropy.io.votable import parse

    url, _ = release_db
    votable = export(url, "votable", tmp_path / "catalogue.vot", "--model", model)
    catalogue = export(url, "fits", tmp_path / "catalogue.fits", "--model", model)
    assert_valid_votable(votable)
    assert_valid_fits(catalogue)

    document = parse(str(votable))
    infos = {info.name: info.value for info in document.resources[0].infos}
    assert infos["model_version"] == model
    assert len(document.get_first_table().array) == (3000 if model == CURRENT else 0)
    # XML IDs are unique (the model_version INFO and FIELD once shared one)
    ids = [element.get("ID") for element in ElementTree.parse(votable).iter()
           if element.get("ID")]
    assert "model_version" in ids and len(ids) == len(set(ids))
    with fits.open(catalogue) as hdus:
        header = hdus["CATALOGUE"].header
        assert header["MODELVER"] == model
        assert header["ARTSHA"] == ("a" if model == CURRENT else "b") * 64
        # provenance is whole, not cut at one card
        assert header["PREPHASH"] == (",".join(["p" * 64, SECOND_HASH]) if model == CURRENT
                                      else "")
        dt.datetime.strptime(header["DATE"], "%Y-%m-%dT%H:%M:%S")  # FITS: no zone letter


def test_exported_csv_has_every_current_estimate(release_db, tmp_path):
    from astropy.table import Table

    url, _ = release_db
    table = Table.read(export(url, "csv", tmp_path / "catalogue.csv"), format="ascii.csv")
    assert len(table) == len(set(table["obsid"])) == 3000
    assert set(table["model_version"]) == {CURRENT}


# The API's VOTable and FITS answers: results, metadata only, overflow, no rows, errors.
API_DOCUMENTS = [
    "/scs?RA=150&DEC=30&SR=0.1",
    "/scs?RA=150&DEC=30&SR=0.1&VERB=1",
    "/scs?RA=150&DEC=30&SR=0.1&VERB=3&MAXREC=5",
    "/scs?RA=0.1&DEC=60.1&SR=0.3&RESPONSEFORMAT=fits",
    "/scs?RA=150&DEC=30&SR=0",
    "/scs?RA=10&DEC=-5&SR=0.0001",
    "/scs?RA=150&DEC=95&SR=0.1",
    "/api/v1/estimates?limit=5&format=votable",
    "/api/v1/estimates?limit=5&format=fits",
    "/api/v1/estimates?teff_min=6000&limit=50&order=-teff&format=votable",
    "/api/v1/estimates?teff_min=6000&limit=50&order=-teff&format=fits",
    "/api/v1/estimates?teff_min=9000&format=votable",
    "/api/v1/estimates?teff_min=9000&format=fits",
]


@pytest.fixture(scope="module")
def client(release_db):
    from service.app import create_app

    app = create_app(service_settings(*release_db))
    yield app.test_client()
    app.extensions["lamost_vac"].dispose()


@pytest.mark.parametrize("path", API_DOCUMENTS)
def test_api_votable_and_fits_answers_validate(client, tmp_path, path):
    response = client.get(path)
    assert response.status_code in (200, 400), response.data[:500]
    if response.mimetype == "application/fits":
        target = tmp_path / "answer.fits"
        target.write_bytes(response.data)
        assert_valid_fits(target)
    else:
        assert response.mimetype == "application/x-votable+xml", response.mimetype
        target = tmp_path / "answer.vot"
        target.write_bytes(response.data)
        assert_valid_votable(target)
