"""Every file the project releases validates (issue 11, item 14): the catalogue written by
``lamost-vac export`` and the API's VOTable and FITS answers (/scs, /api/v1/estimates)
pass STILTS votlint and fitsverify, on SQLite and PostgreSQL."""
import datetime as dt
import math
from xml.etree import ElementTree

import pytest
from sqlalchemy import func, insert, select, update

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


def test_export_refuses_a_target_that_is_not_a_regular_file(release_db, tmp_path):
    """It writes beside the target and renames over it: over a pipe or a device that
    replaced the special file by a regular one (``--out /dev/full`` did)."""
    import contextlib
    import io
    import os
    import stat

    url, _ = release_db
    fifo, folder = tmp_path / "pipe", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    for target in (fifo, folder):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli_main(["export", "--format", "votable", "--out", str(target), "--url", url])
        assert code == 1 and "is not a regular file" in err.getvalue() and str(target) in err.getvalue()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and folder.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "pipe"]     # no .part left


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


ODD_VERSION = 'v2.0 "a" & <b>, c\\d'


@pytest.fixture(scope="module")
def pg_release_db(make_database):
    """The test catalogue on PostgreSQL with missing and non-finite estimates."""
    from conftest import load_catalogue, make_catalogue
    from etl import db

    url = make_database("postgresql")
    db.upgrade(url)
    load_catalogue(url, make_catalogue())
    engine = db.make_engine(url)
    e = schema.estimates
    with engine.begin() as connection:
        connection.execute(update(e).where(e.c.obsid % 7 == 0).values(teff_err=None))
        for value, modulus in ((float("nan"), 11), (float("inf"), 13), (float("-inf"), 17)):
            connection.execute(update(e).where(e.c.obsid % modulus == 0).values(feh=value))
        # a model version that needs escaping in every format holds some of the rows
        connection.execute(insert(schema.models).values(
            version=ODD_VERSION, created_at=NOW, status="retired",
            artifact_path="/models/odd.joblib", artifact_sha256="c" * 64,
            code_version="0.1.0", training_set={}, metrics={}))
        connection.execute(update(e).where(e.c.obsid % 19 == 0, e.c.model_version == CURRENT)
                           .values(model_version=ODD_VERSION))
        counts = dict(connection.execute(select(e.c.model_version, func.count())
                                         .group_by(e.c.model_version)).all())
    engine.dispose()
    return url, counts


@pytest.mark.parametrize("fmt", ["csv", "fits", "votable"])
def test_postgresql_copy_export_is_the_row_export(pg_release_db, tmp_path, fmt):
    """On PostgreSQL the server formats the rows (COPY); the result is the table the
    row-by-row writers (the SQLite path) give: same values, same missing cells."""
    import numpy as np

    from etl import db
    from etl.export import export_catalogue

    url, counts = pg_release_db
    engine = db.make_engine(url)
    suffix = {"csv": "csv", "fits": "fits", "votable": "vot"}[fmt]
    tables = {}
    for use_copy in (True, False):
        path = tmp_path / f"{use_copy}.{suffix}"
        info = export_catalogue(engine, str(path), fmt, use_copy=use_copy, chunk_rows=700)
        if fmt == "fits":
            assert_valid_fits(path)
        elif fmt == "votable":
            assert_valid_votable(path)
        tables[use_copy] = read_table(path)
    engine.dispose()
    copied, rows = tables[True], tables[False]
    assert len(copied) == info["rows"] == counts[CURRENT]
    assert copied.colnames == rows.colnames
    for name in copied.colnames:
        a, b = copied[name], rows[name]
        if a.dtype.kind == "f":
            a, b = as_float(a), as_float(b)
            np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=name)
            np.testing.assert_array_equal(a[np.isfinite(a)], b[np.isfinite(b)], err_msg=name)
        else:
            assert list(a) == list(b), name
    feh, obsid = as_float(copied["feh"]), np.asarray(copied["obsid"])
    for modulus in (11, 13, 17):                               # NaN and +-inf: empty cells
        assert np.isnan(feh[obsid % modulus == 0]).all()
    assert np.isfinite(feh[(obsid % 11 != 0) & (obsid % 13 != 0) & (obsid % 17 != 0)]).all()


def read_table(path):
    """An exported file as an astropy Table (units it cannot parse stay strings)."""
    from astropy.table import Table

    if path.suffix == ".csv":
        return Table.read(str(path), format="ascii.csv")
    if path.suffix == ".fits":
        return Table.read(str(path), unit_parse_strict="silent")
    return Table.read(str(path))


def as_float(column):
    """A table column as a float array with NaN where the cell is empty."""
    import numpy as np
    return np.asarray(np.ma.filled(np.ma.asanyarray(column, dtype=float), np.nan))


def test_copy_export_of_a_model_version_that_needs_escaping(pg_release_db, tmp_path):
    """A model version with quotes, '&', '<', a comma and a backslash reaches every format
    intact."""
    from etl import db
    from etl.export import export_catalogue

    url, counts = pg_release_db
    engine = db.make_engine(url)
    for fmt, suffix in (("csv", "csv"), ("fits", "fits"), ("votable", "vot")):
        path = tmp_path / f"odd.{suffix}"
        export_catalogue(engine, str(path), fmt, model_version=ODD_VERSION)
        table = read_table(path)
        assert len(table) == counts[ODD_VERSION] > 0, fmt
        assert set(table["model_version"]) == {ODD_VERSION}, fmt
    engine.dispose()
    assert_valid_votable(tmp_path / "odd.vot")
    assert_valid_fits(tmp_path / "odd.fits")


CELLS = [("int", 9007199254740993), ("int", -1), ("int", None), ("float", 5000.0),
         ("float", 1e-300), ("float", -0.0), ("float", 0.1 + 0.2), ("float", float("nan")),
         ("float", float("inf")), ("float", float("-inf")), ("float", None),
         ("text", 'a<b>&amp; "c" \'d\'\n\r\n\t\x01\ufffe, end\\'), ("text", ""), ("text", None)]


def test_server_written_tabledata_cells_hold_the_values(pg_release_db):
    """etl.votable.tabledata_row_sql (export and /scs on PostgreSQL): every value reads
    back as itself -- NULL, NaN and +-inf empty, floats exact, text XML-escaped (quotes and
    line breaks as references, characters XML forbids dropped) -- on one line."""
    from sqlalchemy import BigInteger, Float, Text, cast, literal, null

    from etl import db
    from etl.schema import ColumnDescription
    from etl.votable import tabledata_row_sql

    types = {"int": BigInteger, "float": Float(53), "text": Text}
    cells = [(cast(null(), types[kind]) if value is None else literal(value, types[kind]),
              ColumnDescription(f"c{i}", kind, None, None, "", True))
             for i, (kind, value) in enumerate(CELLS)]
    engine = db.make_engine(pg_release_db[0])
    with engine.connect() as connection:
        line = connection.execute(select(tabledata_row_sql(cells))).scalar_one()
    engine.dispose()
    assert "\n" not in line and "\r" not in line and '"' not in line
    texts = [cell.text or "" for cell in ElementTree.fromstring(line)]
    for (kind, value), text in zip(CELLS, texts):
        if value is None or (kind == "float" and not math.isfinite(value)):
            assert text == "", (kind, value, text)
        elif kind == "float":
            assert float(text) == value and math.copysign(1, float(text)) == math.copysign(1, value)
        elif kind == "int":
            assert int(text) == value
        else:
            assert text == value.replace("\x01", "").replace("\ufffe", ""), text


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
