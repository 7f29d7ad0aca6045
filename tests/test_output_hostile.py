"""Hostile or unusual TAP requests against the output writers, on a real PostgreSQL
catalogue: a small upload whose declarations would make astropy allocate gigabytes
(service/tap_upload.py), BINARY2 cells of every datatype a result can declare
(etl/votable.py), and FITS answers whose column aliases are not ASCII
(service/formats.py)."""
import bz2
import dataclasses
import gzip
import io

import numpy as np
import pytest

from etl import db
from conftest import CURRENT, parse_votable, service_settings, tap_error_message
from release_validators import assert_valid_fits, assert_valid_votable

# Small enough that a bomb's "before" costs the old code megabytes, not gigabytes.
UPLOAD_MAX_BYTES = 100_000


@pytest.fixture(scope="module")
def tap_app(postgresql_catalogue, tmp_path_factory):
    from service.app import create_app

    settings = dataclasses.replace(
        service_settings(*postgresql_catalogue), tap_upload_max_bytes=UPLOAD_MAX_BYTES,
        tap_job_dir=str(tmp_path_factory.mktemp("tap-jobs")),
        large_queries_per_client=1000, large_queries_max=1000)
    application = create_app(settings)
    application.config["TESTING"] = True
    yield application
    application.extensions["lamost_vac"].dispose()


@pytest.fixture
def client(tap_app):
    return tap_app.test_client()


def tap(client, query, **params):
    return client.post("/tap/sync", data={"LANG": "ADQL", "QUERY": query, **params})




# ---------------------------------------------------------------------------------------
# 1. An upload is refused before astropy allocates what its declarations say.
def votable(fields, rows="<TR><TD>x</TD></TR>", table_attributes=""):
    return ('<?xml version="1.0"?><VOTABLE version="1.3" '
            'xmlns="http://www.ivoa.net/xml/VOTable/v1.3"><RESOURCE>'
            f'<TABLE{table_attributes}>{fields}<DATA><TABLEDATA>{rows}</TABLEDATA></DATA>'
            '</TABLE></RESOURCE></VOTABLE>').encode()


def upload(client, data, query="SELECT * FROM TAP_UPLOAD.t"):
    return client.post("/tap/sync", content_type="multipart/form-data", data={
        "LANG": "ADQL", "QUERY": query, "UPLOAD": "t,param:f",
        "f": (io.BytesIO(data), "t.vot")})


TWENTY_WIDE = "".join(f'<FIELD name="w{i}" datatype="char" arraysize="{UPLOAD_MAX_BYTES}"/>'
                      for i in range(20))
BOMBS = [
    # (file, what the refusal names)
    (votable('<FIELD name="big" datatype="char" arraysize="5000000"/>'),
     "FIELD 'big': arraysize='5000000' declares more than 100000 elements"),
    (votable('<FIELD name="wide" datatype="unicodeChar" arraysize="2000000*"/>'),
     "FIELD 'wide': arraysize='2000000*'"),
    (votable('<FIELD name="grid" datatype="double" arraysize="400x400"/>',
             "<TR><TD>1</TD></TR>"), "FIELD 'grid': arraysize='400x400'"),
    (votable('<FIELD name="cube" datatype="short" arraysize="500x500x*"/>',
             "<TR><TD>1</TD></TR>"), "FIELD 'cube': arraysize='500x500x*'"),
    (votable('<PARAM name="p" datatype="char" arraysize="' + "9" * 5000 + '" value="x"/>'
             '<FIELD name="a" datatype="char" arraysize="*"/>'), "PARAM 'p': arraysize="),
    (votable('<FIELD name="a" datatype="double"/>', "<TR><TD>1</TD></TR>",
             ' nrows="300000000"'), "TABLE nrows=300000000 is more rows than"),
    # Each FIELD within the limit, twenty of them beyond what a row may take.
    (votable(TWENTY_WIDE, "<TR>" + "<TD>x</TD>" * 20 + "</TR>"),
     "its FIELDs declare 8000020 bytes a row (the widest: FIELD 'w0') for 1 rows"),
    # A narrow row, but declared for many rows.
    (votable('<FIELD name="a" datatype="char" arraysize="1000"/>', "<TR><TD>x</TD></TR>",
             ' nrows="90000"'), "bytes a row (the widest: FIELD 'a') for 90000 rows"),
    # Compressed: astropy inflates it; the declarations are checked all the same.
    (gzip.compress(votable('<FIELD name="big" datatype="char" arraysize="5000000"/>')),
     "FIELD 'big': arraysize='5000000'"),
    (gzip.compress(votable('<FIELD name="a" datatype="char" arraysize="*"/>',
                           "<TR><TD>x</TD></TR>" * 20000)),
     f"more than {UPLOAD_MAX_BYTES} bytes once decompressed (gzip)"),
    (votable('<FIELD name="a" datatype="char" arraysize="ten"/>'),
     "FIELD 'a': arraysize='ten' is not a VOTable array size"),
    (b'<?xml version="1.0"?><!DOCTYPE VOTABLE [<!ENTITY n "5000000">]>'
     + votable('<FIELD name="a" datatype="char" arraysize="&n;"/>')[21:],
     "DTD entity declarations are not accepted"),
    # Data by reference: astropy would read a file of the server (or fetch a URL).
    (votable('<FIELD name="a" datatype="char" arraysize="*"/>').replace(
        b"<TABLEDATA><TR><TD>x</TD></TR></TABLEDATA>",
        b'<BINARY2><STREAM href="file:///etc/passwd"/></BINARY2>'),
     "a STREAM by reference (href='file:///etc/passwd') is not accepted"),
]


@pytest.mark.parametrize("data, fragment", BOMBS,
                         ids=["char", "unicodeChar", "2d", "3d-variable",
                              "param-digits", "nrows", "twenty-wide", "rows-x-width",
                              "gzip", "gzip-inflated", "not-a-size", "entity", "stream-href"])
def test_upload_declarations_beyond_the_byte_limit_are_refused(client, data, fragment):
    assert len(data) < UPLOAD_MAX_BYTES
    response = upload(client, data)
    assert response.status_code == 400, response.data[-500:]
    message = tap_error_message(response)
    assert message.startswith("UPLOAD t: "), message
    assert fragment in message, message


def test_uploads_within_the_declaration_limits_are_read(client):
    fields = ('<FIELD name="ra" datatype="double"/><FIELD name="name" datatype="char" '
              'arraysize="12"/><FIELD name="note" datatype="unicodeChar" arraysize="8*"/>'
              '<FIELD name="n" datatype="short"/>')
    rows = "<TR><TD>10.5</TD><TD>alpha</TD><TD>é</TD><TD>3</TD></TR>" \
           "<TR><TD>11.5</TD><TD>beta</TD><TD></TD><TD>4</TD></TR>"
    data = votable(fields, rows, ' nrows="2"')
    for packed in (data, gzip.compress(data), bz2.compress(data)):
        response = upload(client, packed, "SELECT ra, name, note, n FROM TAP_UPLOAD.t "
                                          "ORDER BY ra")
        assert response.status_code == 200, response.data[-500:]
        table = parse_votable(response.data).get_first_table().to_table()
        assert list(table["ra"]) == [10.5, 11.5] and list(table["n"]) == [3, 4]
        assert [str(v) for v in table["name"]] == ["alpha", "beta"]
        assert str(table["note"][0]) == "é"


# ---------------------------------------------------------------------------------------
# 2. BINARY2 writes each cell as its FIELD declares it, and reads as TABLEDATA does.
BINARY2_QUERIES = [
    "SELECT TOP 3 LENGTH(designation) AS l FROM v_spectra ORDER BY obsid",
    "SELECT TOP 5 obsid, CAST(flags AS INTEGER) AS f, LENGTH(designation) AS l, "
    "CAST(teff AS REAL) AS r, CAST(spid AS SMALLINT) AS s, teff, designation "
    "FROM v_current_estimates JOIN v_spectra USING (obsid) ORDER BY obsid",
    "SELECT TOP 5 obsid, model_version, created_at, teff FROM v_estimates ORDER BY obsid",
    # NULL cells of every width (teff is NULL for a few rows).
    "SELECT TOP 40 obsid, CAST(teff AS INTEGER) AS i, CAST(teff AS SMALLINT) AS s, "
    "CAST(teff AS REAL) AS r, teff FROM v_current_estimates WHERE teff IS NULL OR obsid < "
    "100010 ORDER BY obsid",
    "SELECT table_name, column_name, datatype, principal, indexed, std, column_index "
    "FROM TAP_SCHEMA.columns ORDER BY table_name, column_index",
    # Text that is not ASCII: unicodeChar in both serializations.
    "SELECT TOP 2 'é' AS x, 'a😀b' AS y, designation FROM v_spectra ORDER BY obsid",
]


def same_arrays(a, b):
    assert a.dtype.names == b.dtype.names
    for name in a.dtype.names:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
        assert list(np.ma.getmaskarray(x)) == list(np.ma.getmaskarray(y)), name
        keep = ~np.ma.getmaskarray(x)
        assert list(np.asarray(x)[keep]) == list(np.asarray(y)[keep]), name


@pytest.mark.parametrize("query", BINARY2_QUERIES)
def test_binary2_reads_as_tabledata_does(client, tmp_path, query):
    answers = {}
    for fmt in ("votable", "binary2"):
        response = tap(client, query, RESPONSEFORMAT=fmt, MAXREC="10000")
        assert response.status_code == 200, response.data[-500:]
        (tmp_path / f"{fmt}.vot").write_bytes(response.data)
        answers[fmt] = parse_votable(response.data).get_first_table()
    assert b"<BINARY2>" in (tmp_path / "binary2.vot").read_bytes()
    text, binary = answers["votable"], answers["binary2"]
    assert [(f.name, f.datatype) for f in text.fields] == \
        [(f.name, f.datatype) for f in binary.fields]
    assert len(text.array) > 0
    same_arrays(text.array, binary.array)
    for fmt in answers:
        assert_valid_votable(tmp_path / f"{fmt}.vot")


def test_binary2_cells_have_the_declared_widths(client, postgresql_catalogue):
    from sqlalchemy import text as sql

    engine = db.make_engine(postgresql_catalogue[0])
    with engine.connect() as connection:
        lengths = [r[0] for r in connection.execute(sql(
            "SELECT length(designation) FROM spectra ORDER BY obsid LIMIT 3"))]
        flags = [r[0] for r in connection.execute(sql(
            "SELECT flags FROM estimates WHERE model_version = :v ORDER BY obsid LIMIT 5"),
            {"v": CURRENT})]
    engine.dispose()
    table = parse_votable(tap(client, "SELECT TOP 3 LENGTH(designation) AS l FROM v_spectra "
                                      "ORDER BY obsid", RESPONSEFORMAT="binary2").data)
    assert table.get_first_table().get_field_by_id("l").datatype == "int"
    assert list(table.get_first_table().array["l"]) == lengths
    table = parse_votable(tap(client, "SELECT TOP 5 CAST(flags AS SMALLINT) AS f, "
                                      "CAST(2.5 AS REAL) AS r FROM v_current_estimates "
                                      "ORDER BY obsid", RESPONSEFORMAT="binary2").data)
    array = table.get_first_table().array
    assert array["f"].dtype == np.int16 and list(array["f"]) == flags
    assert array["r"].dtype == np.float32 and list(array["r"]) == [2.5] * 5
    table = parse_votable(tap(client, "SELECT TOP 2 'é' AS x FROM v_spectra",
                              RESPONSEFORMAT="binary2").data).get_first_table()
    assert table.get_field_by_id("x").datatype == "unicodeChar"
    assert [str(v) for v in table.array["x"]] == ["é", "é"]


# ---------------------------------------------------------------------------------------
# 3. FITS column names are printable ASCII on one card, unique.
def test_fits_with_non_ascii_aliases_is_valid(client, tmp_path):
    from astropy.table import Table

    # PostgreSQL cuts names to 63 bytes: 21 three-byte characters, whose FITS form is
    # longer than a card holds.
    query = ('SELECT TOP 2 obsid AS "é", ra AS e, dec AS "温度", snrg AS "' + "温" * 21
             + '" FROM v_spectra ORDER BY obsid')
    response = tap(client, query, RESPONSEFORMAT="fits")
    assert response.status_code == 200, response.data[-500:]
    path = tmp_path / "aliases.fits"
    path.write_bytes(response.data)
    assert_valid_fits(path)
    table = Table.read(path)
    assert table.colnames == ["e_2", "e", "_u6e29_u5ea6", ("_u6e29" * 12)[:68]]
    reference = parse_votable(tap(client, query).data).get_first_table()
    assert [f.name for f in reference.fields] == ["é", "e", "温度", "温" * 21]
    for fits_name, vo_name in zip(table.colnames, reference.array.dtype.names):
        assert list(table[fits_name]) == list(reference.array[vo_name]), fits_name
