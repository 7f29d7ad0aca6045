"""The read-only query service (service/): cone search, range queries, formats, limits,
read-only access, OpenAPI (schemathesis), on SQLite and PostgreSQL (Q3C)."""
import base64
import json
import io
import math
import re

import numpy as np
import pytest
from sqlalchemy import text

from conftest import (CURRENT, N_SPECTRA, RETIRED, expected_cone, parse_votable,
                      service_settings, with_test_limits)
from etl import db
from etl.settings import Settings

try:
    import schemathesis
except ImportError:         # test-only tool: pip install schemathesis
    schemathesis = None

@pytest.fixture(scope="module")
def app(service_db):
    from service.app import create_app

    url, reader_url, _ = service_db
    settings = service_settings(url, reader_url)
    application = create_app(with_test_limits(settings))
    application.config["TESTING"] = True
    yield application
    application.extensions["lamost_vac"].dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def cat(service_db):
    return service_db[2]


def scs(client, **params):
    response = client.get("/scs", query_string=params)
    assert response.status_code == 200, response.data[:500]
    return response


# ---------------------------------------------------------------------------------------
# Cone search
CONES = [
    (150.0, 30.0, 0.02),            # dense cluster
    (150.0, 30.0, 0.2),
    (0.0, 0.0, 0.5),                # across RA = 0/360
    (359.9, 0.1, 0.4),
    (360.0, 60.0, 0.6),             # RA = 360 is RA = 0
    (0.2, 60.2, 0.3),
    (17.0, 89.9, 0.3),              # north pole inside the cone
    (200.0, 89.5, 0.2),             # near, not over, the pole
    (0.0, 90.0, 0.4),
    (123.0, -89.8, 0.5),            # south pole
    (300.0, -90.0, 0.25),
    (45.0, -30.0, 9.9),             # wide cone
]


@pytest.mark.parametrize("ra, dec, radius", CONES)
def test_cone_search_is_exact_and_ordered_by_distance(client, cat, ra, dec, radius):
    expected_ids, expected_distance = expected_cone(cat, ra, dec, radius)
    assert expected_ids, "test cone must not be empty"
    table = parse_votable(scs(client, RA=ra, DEC=dec, SR=radius, VERB=1).data) \
        .get_first_table().to_table()
    assert [int(i) for i in table["obsid"]] == expected_ids
    assert np.allclose(np.asarray(table["distance"]), expected_distance, rtol=0, atol=1e-9)
    assert np.all(np.diff(np.asarray(table["distance"])) >= 0)


def test_cone_search_votable_follows_scs(client, cat):
    response = scs(client, RA=150, DEC=30, SR=0.05)
    assert response.mimetype == "application/x-votable+xml"
    votable = parse_votable(response.data)
    # the results first, then the DataLink service descriptor of the rows' obsids (SCS
    # 1.03 erratum 2 allows modern VOTables for this very use)
    assert [(r.type, r.utype) for r in votable.resources] == [
        ("results", None), ("meta", "adhoc:service")]
    resource = votable.resources[0]
    assert len(resource.tables) == 1
    statuses = [i.value for i in resource.infos if i.name == "QUERY_STATUS"]
    assert statuses == ["OK"]
    fields = {f.name: f for f in resource.tables[0].fields}
    ucds = [f.ucd for f in fields.values()]
    for ucd in ("ID_MAIN", "POS_EQ_RA_MAIN", "POS_EQ_DEC_MAIN"):
        assert ucds.count(ucd) == 1
    assert fields["obsid"].ucd == "ID_MAIN" and fields["obsid"].datatype == "long"
    assert (fields["distance"].ucd, fields["distance"].unit) == ("pos.angDistance", "deg")
    assert (fields["teff"].ucd, str(fields["teff"].unit)) == ("phys.temperature.effective", "K")
    assert fields["teff_err"].ucd == "stat.error;phys.temperature.effective"
    assert fields["feh"].ucd == "phys.abund.Fe" and fields["feh"].description
    rows = resource.tables[0].to_table()
    assert set(rows["model_version"]) == {CURRENT}          # current model only


@pytest.mark.parametrize("verb", [1, 2, 3])
@pytest.mark.parametrize("ra, dec, radius", [(150.0, 30.0, 0.2), (45.0, -30.0, 9.9)])
def test_cone_search_votable_rows_are_the_json_rows(app, client, verb, ra, dec, radius):
    """On PostgreSQL the VOTable's rows are written by the server, the JSON's by Python:
    the same rows, values and missing cells either way (on SQLite, and for VERB=3 whose
    timestamps the server does not write, both are Python's)."""
    from service.blueprints.scs import scs_query

    engine = app.extensions["lamost_vac"].cone_engine
    with engine.connect() as connection:
        server_lines, _ = scs_query(connection, ra, dec, radius, verb, 10, tabledata=True)
    assert (server_lines is not None) == (db.is_postgres(engine) and verb < 3)
    params = dict(RA=ra, DEC=dec, SR=radius, VERB=verb)
    table = parse_votable(scs(client, **params).data).get_first_table().to_table()
    as_json = scs(client, RESPONSEFORMAT="json", **params).get_json()
    names = [c["name"] for c in as_json["columns"]]
    assert table.colnames == names and len(table) == len(as_json["rows"]) > 0
    for index, row in enumerate(as_json["rows"]):
        for name in names:
            value, cell = row[name], table[name][index]
            if isinstance(value, str) and value.endswith("+00:00"):
                value = value.removesuffix("+00:00")    # a timestamp: DALI's has no offset
            if value is None:
                assert np.ma.is_masked(cell) or cell == "" or (
                    isinstance(cell, float) and math.isnan(cell)), (name, cell)
            elif isinstance(value, float):
                assert float(cell) == value, (name, cell, value)
            else:
                assert str(cell) == str(value), (name, cell, value)


def test_cone_search_verbosity(client):
    names = {}
    for verb in (1, 2, 3):
        table = parse_votable(scs(client, RA=150, DEC=30, SR=0.01, VERB=verb).data) \
            .get_first_table()
        names[verb] = [f.name for f in table.fields]
    assert names[1] == ["obsid", "ra", "dec", "distance"]
    assert set(names[1]) < set(names[2]) < set(names[3])
    assert {"teff_err_model", "planid", "preprocessing_hash"} <= set(names[3])


def test_maxrec_overflow_info_after_the_table(client, cat):
    expected_ids, _ = expected_cone(cat, 150.0, 30.0, 0.1)
    assert len(expected_ids) > 5
    response = scs(client, RA=150, DEC=30, SR=0.1, MAXREC=5)
    assert response.headers["X-Query-Status"] == "OVERFLOW"
    body = response.data.decode()
    assert body.index('value="OVERFLOW"') > body.index("</TABLE>")
    votable = parse_votable(response.data)
    assert [int(i) for i in votable.get_first_table().to_table()["obsid"]] == expected_ids[:5]
    statuses = [i.value for i in votable.resources[0].infos if i.name == "QUERY_STATUS"]
    assert statuses == ["OK", "OVERFLOW"]
    exact = scs(client, RA=150, DEC=30, SR=0.1, MAXREC=len(expected_ids))
    assert exact.headers["X-Query-Status"] == "OK"


@pytest.mark.parametrize("params", [dict(SR=0), dict(SR=0.1, MAXREC=0)])
def test_sr_zero_or_maxrec_zero_returns_metadata_only(client, params):
    votable = parse_votable(scs(client, RA=150, DEC=30, **params).data)
    table = votable.get_first_table()
    assert len(table.array) == 0
    assert [f.name for f in table.fields][:4] == ["obsid", "ra", "dec", "distance"]


@pytest.mark.parametrize("params, parameter", [
    (dict(DEC=30, SR=0.1), "RA"),
    (dict(RA="", DEC=30, SR=0.1), "RA"),
    (dict(RA="abc", DEC=30, SR=0.1), "RA"),
    (dict(RA="nan", DEC=30, SR=0.1), "RA"),
    (dict(RA=361, DEC=30, SR=0.1), "RA"),
    (dict(RA=150, SR=0.1), "DEC"),
    (dict(RA=150, DEC=91, SR=0.1), "DEC"),
    (dict(RA=150, DEC=-90.5, SR=0.1), "DEC"),
    (dict(RA=150, DEC="1e999", SR=0.1), "DEC"),
    (dict(RA=150, DEC=30), "SR"),
    (dict(RA=150, DEC=30, SR=-1), "SR"),
    (dict(RA=150, DEC=30, SR=10.5), "SR"),
    (dict(RA=150, DEC=30, SR=0.1, VERB=4), "VERB"),
    (dict(RA=150, DEC=30, SR=0.1, MAXREC=-1), "MAXREC"),
    (dict(RA=150, DEC=30, SR=0.1, RESPONSEFORMAT="pdf"), "RESPONSEFORMAT"),
])
def test_cone_search_errors_are_votable_documents(client, params, parameter):
    response = client.get("/scs", query_string=params)
    assert response.status_code == 200
    assert response.mimetype == "application/x-votable+xml"
    votable = parse_votable(response.data)
    status = [i for i in votable.resources[0].infos if i.name == "QUERY_STATUS"]
    assert len(status) == 1 and status[0].value == "ERROR"
    assert status[0].content.startswith(parameter + ":")


@pytest.mark.parametrize("query", [
    # Found by schemathesis: a denormal SR underflowed inside q3c_radial_query (500).
    "/scs?RA=325.7&DEC=22.89&SR=2.0967174581272007e-182",
    "/scs?RA=1e-300&DEC=-1e-300&SR=0.5",
    "/scs?RA=359.99999999999999&DEC=89.999999999999&SR=1e-300&VERB=3",
    "/scs?RA=0&DEC=-90&SR=10&MAXREC=99999999999999",
    "/api/v1/estimates?ra=1e-300&dec=-1e-300&radius=1e-300",
    "/api/v1/estimates?teff_min=-1e300&logg_max=1e300&ra=360&dec=90&radius=1e-320",
])
def test_extreme_but_valid_numbers_are_answered(client, query):
    response = client.get(query)
    assert response.status_code == 200, response.data[:300]
    assert b'value="ERROR"' not in response.data


def test_cone_search_parameter_names_are_case_insensitive_and_extra_ignored(client, cat):
    response = client.get("/scs?ra=150&Dec=30&sr=0.02&verb=1&foo=bar")
    table = parse_votable(response.data).get_first_table().to_table()
    assert [int(i) for i in table["obsid"]] == expected_cone(cat, 150, 30, 0.02)[0]
    twice = parse_votable(client.get("/scs?RA=150&ra=151&DEC=30&SR=0.1").data)
    assert "given more than once" in twice.resources[0].infos[0].content


def test_cone_search_formats(client, cat):
    from astropy.io import fits

    expected_ids, _ = expected_cone(cat, 150.0, 30.0, 0.03)
    as_json = scs(client, RA=150, DEC=30, SR=0.03, RESPONSEFORMAT="json").get_json()
    assert [r["obsid"] for r in as_json["rows"]] == expected_ids
    assert as_json["columns"][0]["ucd"] == "ID_MAIN" and as_json["query_status"] == "OK"
    as_csv = scs(client, RA=150, DEC=30, SR=0.03, RESPONSEFORMAT="text/csv")
    assert as_csv.mimetype == "text/csv"
    lines = as_csv.data.decode().splitlines()
    assert lines[0].split(",")[:4] == ["obsid", "ra", "dec", "distance"]
    assert [int(line.split(",")[0]) for line in lines[1:]] == expected_ids
    as_fits = scs(client, RA=150, DEC=30, SR=0.03, RESPONSEFORMAT="fits")
    with fits.open(io.BytesIO(as_fits.data)) as hdus:
        header, data = hdus[1].header, hdus[1].data
        assert list(data["obsid"]) == expected_ids
        index = data.columns.names.index("teff") + 1
        assert header[f"TUNIT{index}"] == "K"
        assert header[f"TUCD{index}"] == "phys.temperature.effective"
        assert header["TUCD1"] == "ID_MAIN"


# ---------------------------------------------------------------------------------------
# Indexes and parameterised SQL
def explain(app, statement):
    engine = app.extensions["lamost_vac"].cone_engine
    with engine.connect() as connection:
        compiled = statement.compile(connection)
        prefix = "EXPLAIN" if db.is_postgres(connection) else "EXPLAIN QUERY PLAN"
        rows = connection.exec_driver_sql(f"{prefix} {compiled.string}",
                                          _positional(compiled, connection)).all()
    return "\n".join(" ".join(str(v) for v in row) for row in rows), compiled


def estimate_rows_read(engine, statement):
    """How many rows of ``estimates`` the statement reads (PostgreSQL's EXPLAIN ANALYZE:
    a probe's rows times its loops, or a scan's rows)."""
    def nodes(node):
        yield node
        for child in node.get("Plans", ()):
            yield from nodes(child)

    with engine.connect() as connection:
        compiled = statement.compile(connection)
        (plan,), = connection.exec_driver_sql(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled.string}",
            _positional(compiled, connection)).one()
    reads = [n for n in nodes(plan["Plan"])
             if n.get("Relation Name", "").startswith("estimates")]
    assert reads, plan
    return sum(n["Actual Rows"] * n["Actual Loops"] for n in reads)


def _positional(compiled, connection):
    params = compiled.construct_params()
    if db.is_postgres(connection):
        return params
    return tuple(params[name] for name in compiled.positiontup)


def test_cone_search_uses_the_position_index_with_bound_parameters(app):
    from service.blueprints.scs import scs_statement

    engine = app.extensions["lamost_vac"].cone_engine
    with engine.connect() as connection:
        statement = scs_statement(connection, 150.123, 30.456, 0.0167, 2, 101)
    plan, compiled = explain(app, statement)
    if engine.dialect.name == "postgresql":
        assert "spectra_q3c_idx" in plan, plan
    else:
        assert "ix_spectra_zone_ra" in plan, plan
    # Parameterised: no client value is in the SQL text.
    for value in ("150.123", "30.456", "0.0167", "101"):
        assert value not in compiled.string


def test_wide_cone_looks_up_estimates_only_for_the_rows_it_returns(app, cat):
    """A cone holding more spectra than MAXREC probes the estimates of the nearest MAXREC
    only (each probe is an index descent: a 1-deg cone at DR8 density holds ~10^4)."""
    from service.blueprints.scs import scs_statement

    engine = app.extensions["lamost_vac"].cone_engine
    if engine.dialect.name != "postgresql":
        pytest.skip("the lookup plan is PostgreSQL's (SQLite joins in one scan)")
    in_cone = len(expected_cone(cat, 0.0, 0.0, 0.5)[0])
    maxrows = 3
    assert in_cone > 2 * maxrows
    with engine.connect() as connection:
        statement = scs_statement(connection, 0.0, 0.0, 0.5, 2, maxrows)
    assert estimate_rows_read(engine, statement) <= maxrows


def test_sql_injection_attempts_are_rejected(client):
    for params in (dict(RA="150; DROP TABLE spectra", DEC=30, SR=0.1),
                   dict(RA="150", DEC="30 OR 1=1", SR=0.1)):
        body = client.get("/scs", query_string=params).data.decode()
        assert 'value="ERROR"' in body
    response = client.get("/api/v1/estimates", query_string={
        "model_version": "v2.0' OR '1'='1"})
    assert response.status_code == 400
    assert response.get_json()["parameter"] == "model_version"


# ---------------------------------------------------------------------------------------
# /api/v1/estimates
def test_estimates_ranges_flags_and_default_model(client, cat):
    response = client.get("/api/v1/estimates", query_string=dict(
        teff_min=5000, teff_max=5500, logg_min=4, feh_max=0, snrg_min=20,
        exclude_flags=4, limit=1000))
    assert response.status_code == 200
    document = response.get_json()
    assert document["model_version"] == CURRENT and document["next"] is None
    expected = {int(cat["obsid"][i]) for i in range(N_SPECTRA)
                if not cat["teff_null"][i] and 5000 <= cat["teff"][i] <= 5500
                and cat["logg"][i] >= 4 and cat["feh"][i] <= 0 and cat["snrg"][i] >= 20
                and not cat["flags"][i] & 4}
    assert {r["obsid"] for r in document["rows"]} == expected
    assert [r["obsid"] for r in document["rows"]] == sorted(expected)
    units = {c["name"]: c["unit"] for c in document["columns"]}
    assert units["teff"] == "K" and units["ra"] == "deg"
    exact = client.get("/api/v1/estimates?flags=5&limit=10000").get_json()
    assert {r["obsid"] for r in exact["rows"]} == \
        {int(cat["obsid"][i]) for i in range(N_SPECTRA) if cat["flags"][i] == 5}


def test_estimates_model_version_and_error_ranges(client):
    retired = client.get(f"/api/v1/estimates?model_version={RETIRED}&limit=10000").get_json()
    assert len(retired["rows"]) == N_SPECTRA // 2
    assert {r["model_version"] for r in retired["rows"]} == {RETIRED}
    errors = client.get("/api/v1/estimates?teff_err_max=90&logg_err_min=0.15&limit=10000"
                        "&columns=obsid,teff_err,logg_err").get_json()
    assert errors["rows"] and all(r["teff_err"] <= 90 and r["logg_err"] >= 0.15
                                  for r in errors["rows"])
    assert set(errors["rows"][0]) == {"obsid", "teff_err", "logg_err"}
    unknown = client.get("/api/v1/estimates?model_version=v9")
    assert unknown.status_code == 400 and "v9" in unknown.get_json()["error"]


def test_estimates_cone_and_distance(client, cat):
    expected_ids, expected_distance = expected_cone(cat, 0.0, 0.0, 0.5)
    document = client.get("/api/v1/estimates?ra=0&dec=0&radius=0.5&order=distance"
                          "&limit=10000").get_json()
    assert [r["obsid"] for r in document["rows"]] == expected_ids
    assert np.allclose([r["distance"] for r in document["rows"]], expected_distance,
                       atol=1e-9, rtol=0)


@pytest.mark.parametrize("version", [CURRENT, RETIRED])
def test_estimates_cone_by_distance_with_filters(client, cat, version):
    """Nearest first with conditions on both tables and a model version that lacks some
    spectra: the same rows as the selection in obsid order, nearest first."""
    from service.catalogue import CATALOGUE

    query = ("/api/v1/estimates?ra=0&dec=0&radius=0.5&teff_min=5000&snrg_min=20"
             f"&exclude_flags=4&model_version={version}&limit=10000"
             "&columns=" + ",".join([*CATALOGUE, "distance"]))
    nearest = client.get(query + "&order=distance").get_json()["rows"]
    farthest = client.get(query + "&order=-distance").get_json()["rows"]
    by_obsid = client.get(query + "&order=obsid").get_json()["rows"]
    # the same rows, every column from its own table, as the joined selection has them
    assert nearest and sorted(nearest, key=lambda r: r["obsid"]) == by_obsid
    assert {r["model_version"] for r in nearest} == {version}
    assert farthest == nearest[::-1]
    assert all(r["teff"] >= 5000 and r["snrg"] >= 20 and not r["flags"] & 4 for r in nearest)
    if version == CURRENT:
        selected = {int(cat["obsid"][i]) for i in range(N_SPECTRA)
                    if not cat["teff_null"][i] and cat["teff"][i] >= 5000
                    and cat["snrg"][i] >= 20 and not cat["flags"][i] & 4}
        nearest_first = expected_cone(cat, 0.0, 0.0, 0.5)[0]
        assert [r["obsid"] for r in nearest] == [i for i in nearest_first if i in selected]


def test_estimates_cone_by_distance_looks_up_only_the_page(app, cat):
    """A page of a wide cone ordered by distance probes the estimates of about as many
    spectra as the page holds, not of every spectrum in the cone."""
    from werkzeug.datastructures import MultiDict

    from service.blueprints.estimates import build_query, parameters
    from service.openapi import parse

    service = app.extensions["lamost_vac"]
    if service.engine.dialect.name != "postgresql":
        pytest.skip("the lookup plan is PostgreSQL's")
    in_cone = len(expected_cone(cat, 0.0, 0.0, 0.5)[0])
    args = parse(parameters(service.limits), MultiDict(
        {"ra": "0", "dec": "0", "radius": "0.5", "order": "distance", "limit": "3"}))
    with service.engine.connect() as connection:
        statement = build_query(connection, args, CURRENT, ["obsid", "teff", "distance"])
    assert in_cone > 20
    # one probe per spectrum, nearest first, until the page (3 rows + 1) is full
    assert estimate_rows_read(service.engine, statement) <= 8


@pytest.mark.parametrize("order", ["obsid", "-obsid", "teff", "-teff", "snrg", "-feh",
                                   "distance", "-distance"])
def test_keyset_pagination_walks_every_row_once_in_order(client, order):
    base = "/api/v1/estimates?ra=150&dec=30&radius=0.3&columns=obsid,teff,snrg,feh,distance"
    everything = client.get(f"{base}&order={order}&limit=10000").get_json()["rows"]
    assert len(everything) > 300
    url, seen, pages = f"{base}&order={order}&limit=97", [], 0
    while url:
        response = client.get(url)
        assert response.status_code == 200
        document = response.get_json()
        seen += document["rows"]
        url = document["next"]
        if url:
            assert response.headers["Link"] == f'<{url}>; rel="next"'
            # the page's version is pinned in the link: paging across a switch of the
            # current version does not mix two versions' rows
            assert f"model_version={CURRENT}" in url
        pages += 1
    assert [r["obsid"] for r in seen] == [r["obsid"] for r in everything]
    assert pages == math.ceil(len(everything) / 97)
    name, descending = order.lstrip("-"), order.startswith("-")
    values = [r[name] for r in seen if r[name] is not None]
    assert values == sorted(values, reverse=descending)
    assert all(r[name] is not None for r in seen[:len(values)])   # nulls last


def test_estimates_formats(client):
    from astropy.io import fits

    query = "/api/v1/estimates?teff_min=6000&limit=50&order=-teff"
    rows = client.get(query).get_json()["rows"]
    as_csv = client.get(query + "&format=csv")
    assert as_csv.mimetype == "text/csv" and "Link" in as_csv.headers
    lines = as_csv.data.decode().splitlines()
    assert len(lines) == 51 and lines[0].startswith("obsid,ra,dec")
    votable = parse_votable(client.get(query + "&format=votable").data)
    table = votable.get_first_table()
    assert [int(i) for i in table.to_table()["obsid"]] == [r["obsid"] for r in rows]
    infos = {i.name: i.value for i in votable.resources[0].infos}
    assert infos["model_version"] == CURRENT and infos["next"].startswith("http")
    with fits.open(io.BytesIO(client.get(query + "&format=FITS").data)) as hdus:
        assert list(hdus[1].data["obsid"]) == [r["obsid"] for r in rows]


@pytest.mark.parametrize("query, parameter", [
    ("limit=0", "limit"), ("limit=10001", "limit"), ("limit=ten", "limit"),
    ("teff_min=abc", "teff_min"), ("teff_min=6000&teff_max=5000", "teff_min"),
    ("ra=10&dec=10", "radius"), ("ra=10&dec=10&radius=0", "radius"),
    ("ra=10&dec=10&radius=11", "radius"), ("dec=95&ra=1&radius=1", "dec"),
    ("order=teff_err_model", "order"), ("order=distance", "order"),
    ("columns=obsid,nope", "columns"), ("columns=distance", "columns"),
    ("columns=", None), ("cursor=!!", "cursor"), ("cursor=abc", "cursor"),
    ("format=xlsx", "format"), ("flags=-1", "flags"), ("teff_mn=1", "teff_mn"),
    ("limit=1&limit=2", "limit"), ("model_version=" + "x" * 65, "model_version"),
])
def test_estimates_bad_input_is_400(client, query, parameter):
    response = client.get(f"/api/v1/estimates?{query}")
    if parameter is None:           # an empty optional value means "not given"
        assert response.status_code == 200
        return
    assert response.status_code == 400, response.data
    document = response.get_json()
    assert document["parameter"] == parameter and document["error"].startswith(parameter)


# Digits of other scripts: Arabic-Indic, full-width, Devanagari, a superscript; Python's
# float()/int() and regex \d take most of them.
UNICODE_NUMBERS = ["\u0661\u0662", "\uff11\uff12", "\u0967\u0968", "1\u00b2", "\u00a012"]


@pytest.mark.parametrize("number", UNICODE_NUMBERS)
@pytest.mark.parametrize("name", ["teff_min", "limit", "flags", "ra"])
def test_estimates_numbers_are_ascii_digits_only(client, name, number):
    extra = "&dec=10&radius=0.1" if name == "ra" else ""
    response = client.get(f"/api/v1/estimates?{name}={number}{extra}")
    assert response.status_code == 400, response.data
    document = response.get_json()
    assert document["parameter"] == name and "ASCII digits" in document["error"]


@pytest.mark.parametrize("number", UNICODE_NUMBERS)
def test_spectrum_id_is_ascii_digits_only(client, cat, number):
    response = client.get(f"/api/v1/spectra/{number}")
    assert response.status_code == 400
    assert response.get_json()["parameter"] == "obsid"
    ascii_id = int(cat["obsid"][0])
    assert client.get(f"/api/v1/spectra/{ascii_id}").status_code == 200


@pytest.mark.parametrize("number", UNICODE_NUMBERS)
@pytest.mark.parametrize("name", ["RA", "DEC", "SR", "MAXREC", "VERB"])
def test_cone_search_numbers_are_ascii_digits_only(client, name, number):
    params = {"RA": "150", "DEC": "30", "SR": "0.1", name: number}
    votable = parse_votable(scs(client, **params).data)
    status = [i for i in votable.resources[0].infos if i.name == "QUERY_STATUS"]
    assert status[0].value == "ERROR" and status[0].content.startswith(name + ":")
    assert "ASCII digits" in status[0].content


def test_cursor_from_another_order_is_rejected(client):
    document = client.get("/api/v1/estimates?order=teff&limit=5").get_json()
    cursor = document["next"].split("cursor=")[1]
    response = client.get(f"/api/v1/estimates?order=feh&limit=5&cursor={cursor}")
    assert response.status_code == 400 and "order" in response.get_json()["error"]
    forged = base64.urlsafe_b64encode(b'["obsid", "1; DROP TABLE x", 5]').decode().rstrip("=")
    assert client.get(f"/api/v1/estimates?cursor={forged}").status_code == 400
    # integers beyond the database's 64 bits (were "bigint out of range" / OverflowError)
    for order, value in (("teff", 2 ** 63), ("obsid", -(2 ** 63) - 1), ("teff", 10 ** 400)):
        forged = base64.urlsafe_b64encode(json.dumps([order, value, 5]).encode()).decode()
        response = client.get(f"/api/v1/estimates?order={order}&cursor={forged}")
        assert response.status_code == 400 and response.get_json()["parameter"] == "cursor"


# ---------------------------------------------------------------------------------------
# Spectra, models
def test_spectrum_with_every_model_version(client, cat):
    obsid = int(cat["obsid"][0])
    document = client.get(f"/api/v1/spectra/{obsid}").get_json()
    assert document["spectrum"]["obsid"] == obsid
    assert document["spectrum"]["ra"] == pytest.approx(cat["ra"][0], abs=1e-12)
    assert [e["model_version"] for e in document["estimates"]] == [RETIRED, CURRENT]
    assert document["current_model_version"] == CURRENT
    current = document["estimates"][1]
    assert current["model_status"] == "current"
    assert current["preprocessing_hash"] == "p" * 64 and current["run_id"] == "run-1"
    assert current["model_artifact_sha256"] == "a" * 64
    assert document["columns"]["estimates"]["teff"]["unit"] == "K"
    failed = client.get(f"/api/v1/spectra/{int(cat['obsid'][1])}").get_json()
    assert failed["failures"][0]["reason"] == "truncated file"
    assert [e["model_version"] for e in failed["estimates"]] == [CURRENT]
    assert client.get("/api/v1/spectra/1").status_code == 404
    for bad in ("abc", "-5", "99999999999999999999", "1.5"):
        response = client.get(f"/api/v1/spectra/{bad}")
        assert response.status_code == 400 and response.get_json()["parameter"] == "obsid"


def test_a_pending_version_is_reported_and_not_served(client, service_db):
    """A version being estimated (pending) is named by /api/v1/models and /health, and the
    catalogue keeps serving the current one."""
    engine = db.make_engine(service_db[0])
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE models SET status = 'pending' WHERE version = :v"),
                               {"v": RETIRED})
        document = client.get("/api/v1/models").get_json()
        assert (document["current"], document["pending"]) == (CURRENT, RETIRED)
        assert client.get("/health").get_json()["database"]["pending_model"] == RETIRED
        served = client.get("/api/v1/estimates?limit=10000&columns=model_version").get_json()["rows"]
        assert {r["model_version"] for r in served} == {CURRENT}
    finally:
        with engine.begin() as connection:
            connection.execute(text("UPDATE models SET status = 'retired' WHERE version = :v"),
                               {"v": RETIRED})
        engine.dispose()


def test_models(client):
    document = client.get("/api/v1/models").get_json()
    assert document["current"] == CURRENT and document["pending"] is None
    assert [m["version"] for m in document["models"]] == [CURRENT, RETIRED]
    assert document["models"][0]["metrics"]["teff"]["scatter"] == 90.0
    assert document["models"][0]["training_set"]["n_stars"] == 2000
    assert "artifact_path" not in document["models"][0]
    assert client.get("/api/v1/models?x=1").status_code == 400


# ---------------------------------------------------------------------------------------
# VOSI, health, OpenAPI
def test_vosi_availability_and_capabilities_declare_the_limits(client, app, service_db):
    import xml.etree.ElementTree as ET

    availability = ET.fromstring(client.get("/availability").data)
    ns = {"vosi": "http://www.ivoa.net/xml/VOSIAvailability/v1.0"}
    assert availability.find("vosi:available", ns).text == "true"
    response = client.get("/capabilities")
    assert response.mimetype == "text/xml"
    capabilities = ET.fromstring(response.data)
    cone = [c for c in capabilities.findall("capability")
            if c.get("standardID") == "ivo://ivoa.net/std/ConeSearch"][0]
    limits = app.extensions["lamost_vac"].limits
    assert float(cone.find("maxSR").text) == limits.scs_max_sr_deg
    assert int(cone.find("maxRecords").text) == limits.scs_max_records
    assert cone.find("interface/accessURL").text.endswith("/scs?")
    test_query = cone.find("testQuery")
    assert test_query is not None
    # DataLink everywhere; TAP only where it is served (PostgreSQL)
    access = {c.get("standardID"): c.find("interface/accessURL").text
              for c in capabilities.findall("capability")}
    assert access["ivo://ivoa.net/std/DataLink#links-1.1"] == "http://localhost/datalink/links"
    on_postgresql = service_db[0].startswith("postgresql")
    assert ("ivo://ivoa.net/std/TAP" in access) == on_postgresql
    assert ("tap" in client.get("/").get_json()["endpoints"]) == on_postgresql
    everything = response.data.decode()
    assert "10000 ms" in everything and "at most 10000" in everything
    assert (f"{limits.large_queries_per_client} at a time per client and "
            f"{limits.large_queries_max} at a time on the service") in everything
    health = client.get("/health").get_json()
    assert health["status"] == "ok" and health["database"]["current_model"] == CURRENT
    assert health["database"]["schema_revision"] == db.head_revision()
    assert health["limits"] == limits.as_dict()
    assert health["limits"]["statement_timeout_ms"] == 10000


def test_openapi_documents_every_endpoint_and_parameter(client, app):
    document = client.get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.")
    # The pages for people (blueprint "pages", HTML) are not part of the API document.
    routes = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
              for rule in app.url_map.iter_rules() if not rule.endpoint.startswith("pages.")}
    assert routes == set(document["paths"])
    estimates = {p["name"]: p for p in document["paths"]["/api/v1/estimates"]["get"]
                 ["parameters"]}
    assert estimates["limit"]["schema"]["maximum"] == app.extensions["lamost_vac"] \
        .limits.api_max_limit
    assert "[K]" in estimates["teff_min"]["description"]
    assert "effective temperature" in estimates["teff_min"]["description"]
    scs_params = {p["name"] for p in document["paths"]["/scs"]["get"]["parameters"]}
    assert {"RA", "DEC", "SR", "VERB", "MAXREC", "RESPONSEFORMAT"} == scs_params


@pytest.fixture(scope="module")
def openapi_schema(app):
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


if schemathesis is not None:
    from hypothesis import HealthCheck
    from hypothesis import settings as hypothesis_settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance,
                                                   status_code_conformance)

    fuzzed = schemathesis.pytest.from_fixture("openapi_schema")

    @fuzzed.parametrize()
    @hypothesis_settings(max_examples=25, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))
    def test_schemathesis_finds_no_server_error(case):
        """Property-based fuzzing of every operation in /openapi.json (valid and invalid
        inputs): never a 5xx, only documented status codes and content types."""
        case.call_and_validate(checks=[not_a_server_error, status_code_conformance,
                                       content_type_conformance])
else:
    def test_schemathesis_finds_no_server_error():
        pytest.skip("schemathesis is not installed (pip install schemathesis)")


# ---------------------------------------------------------------------------------------
# Read-only access, statement timeout
def test_service_engine_cannot_write(service_db):
    """Through the service engine a write fails: with the reader role / read-only file,
    and even when the service is (mis)configured with the writer URL."""
    from service.db import make_service_engine

    url, reader_url, _ = service_db
    for reader in (reader_url, None):           # None: falls back to the writer URL
        engine = make_service_engine(service_settings(url, reader))
        try:
            with engine.connect() as connection:
                assert connection.execute(text("SELECT count(*) FROM spectra")).scalar() \
                    == N_SPECTRA
            with pytest.raises(Exception) as caught:
                with engine.begin() as connection:
                    connection.execute(text("DELETE FROM estimates"))
            message = str(caught.value).lower()
            assert any(word in message for word in
                       ("permission denied", "read-only", "readonly")), message
        finally:
            engine.dispose()
    writer = db.make_engine(url)
    with writer.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM estimates")).scalar() > 0
    writer.dispose()


def test_statement_timeout_cancels_long_queries(service_db):
    from service.db import is_statement_timeout, make_service_engine

    url, reader_url, _ = service_db
    engine = make_service_engine(service_settings(url, reader_url, timeout_ms=100))
    slow = ("SELECT pg_sleep(2)" if url.startswith("postgresql") else
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            "WHERE i < 100000000) SELECT count(*) FROM n")
    try:
        with pytest.raises(Exception) as caught:
            with engine.connect() as connection:
                connection.execute(text(slow)).all()
        assert is_statement_timeout(caught.value)
        with engine.connect() as connection:      # the connection is usable again
            assert connection.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


def test_statement_timeout_is_a_503_not_a_500(service_db, monkeypatch):
    from service import app as service_app
    from service.app import create_app
    from service.blueprints import estimates

    url, reader_url, _ = service_db
    application = create_app(service_settings(url, reader_url, timeout_ms=100))
    slow = ("SELECT pg_sleep(2)" if url.startswith("postgresql") else
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            "WHERE i < 100000000) SELECT count(*) FROM n")
    monkeypatch.setattr(estimates, "build_query", lambda *args, **kwargs: text(slow))
    try:
        response = application.test_client().get("/api/v1/estimates")
        assert response.status_code == 503
        assert "statement timeout of 100 ms" in response.get_json()["error"]
    finally:
        application.extensions[service_app.EXTENSION].dispose()


def test_database_down_is_503(tmp_path):
    from service.app import create_app

    missing = tmp_path / "missing.db"
    application = create_app(Settings(database_url=f"sqlite:///{missing}"))
    client = application.test_client()
    assert client.get("/health").status_code == 503
    assert client.get("/api/v1/models").status_code == 503
    body = client.get("/scs?RA=1&DEC=1&SR=0.1").data.decode()
    assert 'value="ERROR"' in body
    assert not missing.exists()                 # read-only: never created


def test_service_limits_from_the_environment():
    from etl.settings import available_cores, load_settings
    from service.state import Limits

    defaults = Limits.from_settings(load_settings({}))
    assert defaults.large_queries_max == max(1, available_cores() // 2)
    assert defaults.small_cone_deg < defaults.scs_max_sr_deg
    limits = Limits.from_settings(load_settings({
        "LAMOST_VAC_SMALL_CONE_DEG": "0.5", "LAMOST_VAC_LARGE_QUERIES_PER_CLIENT": "3",
        "LAMOST_VAC_LARGE_QUERIES_MAX": "7", "LAMOST_VAC_HEALTH_TIMEOUT_MS": "250",
        "LAMOST_VAC_TRUSTED_PROXIES": "0", "LAMOST_VAC_STATEMENT_TIMEOUT_MS": "4000"}))
    assert (limits.small_cone_deg, limits.large_queries_per_client, limits.large_queries_max,
            limits.health_timeout_ms, limits.trusted_proxies, limits.statement_timeout_ms) \
        == (0.5, 3, 7, 250, 0, 4000)
    for name, value in [("LAMOST_VAC_LARGE_QUERIES_PER_CLIENT", "0"),
                        ("LAMOST_VAC_LARGE_QUERIES_MAX", "many"),
                        ("LAMOST_VAC_TRUSTED_PROXIES", "-1"),
                        ("LAMOST_VAC_HEALTH_TIMEOUT_MS", "0"),
                        ("LAMOST_VAC_SCS_MAX_SR_DEG", "nan"),
                        ("LAMOST_VAC_SCS_MAX_SR_DEG", "200"),
                        ("LAMOST_VAC_SCS_MAXREC_DEFAULT", "30000")]:
        with pytest.raises(ValueError, match=name):
            load_settings({name: value})


def test_serve_command_is_registered():
    from etl.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "8123"])
    assert (args.host, args.port) == ("127.0.0.1", 8123)
