"""The pages for people (service/blueprints/pages.py) through the Flask test client, on a
real catalogue (SQLite and PostgreSQL): content negotiation at /, the form translated into
the API's query (same rows, same pages), bad input next to its field (400), the plots,
the spectrum, models and about pages, and spectrum files outside the root never opened.
The same pages in a real browser: test_pages_browser.py."""
import base64
import dataclasses
import html
import re
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from sqlalchemy import select, text, update

from etl import db, schema
from conftest import (CURRENT, RETIRED, load_catalogue, make_catalogue, parse_votable,
                      service_settings, with_test_limits)

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def pages_db(request, make_database):
    url = make_database(request.param)
    db.upgrade(url)
    load_catalogue(url, make_catalogue())
    return url


def make_app(url, **settings_changes):
    from service.app import create_app

    settings = with_test_limits(service_settings(url, db.reader_url_for(url)))
    application = create_app(dataclasses.replace(settings, **settings_changes))
    application.config["TESTING"] = True
    return application


@pytest.fixture(scope="module")
def app(pages_db):
    application = make_app(pages_db)
    yield application
    application.extensions["lamost_vac"].dispose()


@pytest.fixture
def client(app):
    return app.test_client()


def page(client, path, status=200):
    response = client.get(path, headers=BROWSER)
    assert response.status_code == status, response.get_data(as_text=True)[:2000]
    assert response.mimetype == "text/html"
    return response.get_data(as_text=True)


def table_obsids(body):
    return [int(o) for o in re.findall(r'<td><a href="/spectra/(\d+)">', body)]


def link(body, element_id):
    found = re.search(rf'<a href="([^"]+)" id="{element_id}"', body)
    return html.unescape(found.group(1)) if found else None


def api_url(body):
    return html.unescape(re.search(r'id="api-url" readonly value="([^"]+)"', body).group(1))


def test_json_clients_still_get_the_service_description(client):
    for headers in ({}, {"Accept": "application/json"}, {"Accept": "*/*"}):
        response = client.get("/", headers=headers)
        assert response.status_code == 200 and response.mimetype == "application/json"
        assert response.json["endpoints"]["estimates"].endswith("/api/v1/estimates")
    assert client.get("/?x=1", headers={"Accept": "application/json"}).status_code == 400


def test_browser_gets_the_search_form_with_labels_and_the_valid_domain(client):
    body = page(client, "/")
    assert "<form" in body and "Results" not in body
    inputs = re.findall(r'<(?:input|select)[^>]*\bid="([^"]+)"', body)
    assert {"ra", "dec", "radius", "teff_min", "feh_max", "snrg_min", "flags",
            "model_version", "limit"} <= set(inputs)
    for element_id in inputs:
        if element_id != "api-url":
            assert f'for="{element_id}"' in body, f"no label for {element_id}"
    assert "3500 &le; Teff &le; 6500 K" in body and "[Fe/H] &ge; -1.5" in body
    assert "5 &lt; SNRg &le; 80" in body
    assert "predicted Teff outside 3500-6500 K" in body          # the flag meanings
    assert f"{CURRENT} (current)" in body and f"{RETIRED} (retired)" in body


def test_form_runs_the_api_query_sexagesimal_cone_and_units(client, pages_db):
    # 10:00:00 h = 150 deg, +30:00:00 = 30 deg, 6 arcmin = 0.1 deg: the test cluster
    body = page(client, "/?ra=10:00:00&dec=%2B30:00:00&radius=6+arcmin&teff_min=4000"
                        "&exclude=1&exclude=4&limit=500&search=1")
    url = api_url(body)
    query = parse_qs(urlsplit(url).query)
    assert float(query["ra"][0]) == pytest.approx(150.0)
    assert float(query["dec"][0]) == pytest.approx(30.0)
    assert float(query["radius"][0]) == pytest.approx(0.1)
    assert query["exclude_flags"] == ["5"] and query["teff_min"] == ["4000"]
    api = client.get(urlsplit(url).path + "?" + urlsplit(url).query).json
    expected = [row["obsid"] for row in api["rows"]]
    assert expected and table_obsids(body) == expected
    # every column with its unit and description from the schema
    assert 'title="effective temperature' in body.lower() or "Teff" in body
    assert re.search(r">teff<br><span class=\"unit\">\[K\]</span>", body)
    assert re.search(r">distance<br><span class=\"unit\">\[deg\]</span>", body)
    for fmt in ("votable", "csv", "fits"):
        assert html.escape(f"{url}&format={fmt}") in body


def test_next_links_walk_the_same_rows_as_the_api(client):
    selection = "teff_min=5000&teff_max=5600&feh_max=0"
    api_rows = client.get(f"/api/v1/estimates?{selection}&limit=10000").json["rows"]
    query = f"{selection}&limit=20"
    seen, path, pages = [], f"/?{query}", 0
    while path:
        body = page(client, path)
        seen += table_obsids(body)
        path, pages = link(body, "next-page"), pages + 1
        if pages > 1:
            assert link(body, "first-page") == f"/?{query}"
    assert pages > 2 and seen == [row["obsid"] for row in api_rows]


def adql_of(body):
    return html.unescape(re.search(r'<textarea class="copy" id="adql"[^>]*>(.*?)</textarea>',
                                   body, re.S).group(1))


@pytest.mark.parametrize("form", [
    "ra=10:00:00&dec=%2B30:00:00&radius=6+arcmin&teff_min=4000&exclude=1&exclude=4",
    "teff_min=4500&teff_max=6000&logg_max=4.2&feh_min=-1&snrg_min=30",
    f"model_version={RETIRED}&flags=0&feh_max=-0.5",
    "exclude=2&exclude=512&snrg_max=100",
])
def test_adql_shown_selects_the_rows_of_the_api_query(client, pages_db, form):
    """The ADQL on the page, run by /tap/sync (PostgreSQL), returns the rows of the
    page's /api/v1 query, every page of them; on SQLite the page says TAP is not there."""
    body = page(client, f"/?{form}&limit=20&search=1")
    adql = adql_of(body)
    assert adql.startswith("SELECT obsid, ra, dec") and "ORDER BY obsid" in adql
    url = urlsplit(api_url(body))
    every_page = url.query.replace("limit=20", "limit=10000")
    expected = [row["obsid"] for row in client.get(f"{url.path}?{every_page}").json["rows"]]
    assert len(expected) > 20
    if pages_db.startswith("sqlite"):
        assert 'id="no-tap"' in body and link(body, "tap-link") is None
        return
    tap = urlsplit(link(body, "tap-link"))
    assert parse_qs(tap.query)["QUERY"] == [adql]
    response = client.get(f"{tap.path}?{tap.query}")            # the link, as a browser
    assert response.status_code == 200, response.get_data(as_text=True)[:2000]
    table = parse_votable(response.data).get_first_table().to_table()
    assert [int(obsid) for obsid in table["obsid"]] == expected


@pytest.mark.parametrize("text, degrees", [
    ("2 arcmin", 2 / 60), ("30 arcsec", 30 / 3600), ("0.1 deg", 0.1), ("0.5", 0.5),
    ("1e-2 degrees", 0.01), ("5'", 5 / 60), ('12"', 12 / 3600), (" 250 mas ", 250 / 3.6e6),
    (".5d", 0.5), ("1°", 1.0),
])
def test_search_radius_is_a_number_with_an_angular_unit(text, degrees):
    from service.blueprints.pages import parse_radius

    assert parse_radius(text) == pytest.approx(degrees)


@pytest.mark.parametrize("text", ["1 10**99999999 deg", "5 kg", "deg", "1 deg deg",
                                  "1e99999 deg", "2 arcmin + 1 deg", "1 lyr", ""])
def test_search_radius_refuses_anything_else_at_once(text):
    import time

    from service.blueprints.pages import parse_radius

    start = time.perf_counter()
    with pytest.raises(ValueError):
        parse_radius(text)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("query, field, message", [
    ("ra=abc&dec=1&radius=1", "ra", "not a right ascension"),
    ("ra=10&dec=95&radius=1", "dec", "outside [-90, 90]"),
    ("ra=10&dec=1&radius=5+kg", "radius", "not an angle"),
    # astropy's unit parser took minutes over the power (now a number and one unit)
    ("ra=10&dec=1&radius=1+10**99999999+deg", "radius", "not an angle"),
    ("ra=10&dec=1", "radius", "a cone needs RA, Dec and a radius"),
    ("ra=10&dec=1&radius=20+deg", "radius", "outside (0, 10]"),
    ("teff_min=hot", "teff_min", "not a decimal number"),
    ("teff_min=6000&teff_max=5000", "teff_min", "larger than teff_max"),
    ("flags=-1", "flags", "outside [0,"),
    ("exclude=3", "exclude", "not a flag bit"),
    ("model_version=v9.9", "model_version", "no model version"),
    ("limit=0", "limit", "outside [1,"),
    ("cursor=bogus%21", "cursor", "does not match"),
])
def test_bad_form_input_comes_back_next_to_the_field(client, query, field, message):
    body = page(client, f"/?{query}&search=1", status=400)
    error = re.search(rf'<span class="error" id="{field}-error">([^<]*)</span>', body)
    assert error, body
    assert message in html.unescape(error.group(1))
    assert "<form" in body and "Results" not in body
    if field not in ("exclude", "model_version", "limit", "cursor"):
        assert re.search(rf'id="{field}"[^>]*aria-invalid="true"', body)
        given = parse_qs(query).get(field)        # the form keeps what was typed
        assert given is None or f'value="{html.escape(given[0])}"' in body


@pytest.mark.parametrize("plot", ["kiel", "histograms"])
def test_plots_of_the_selection_are_png(client, plot):
    response = client.get(f"/plots/{plot}.png?teff_min=4000&feh_max=0")
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert response.data.startswith(PNG_MAGIC) and len(response.data) > 10_000
    bad = client.get(f"/plots/{plot}.png?teff_min=x", headers=BROWSER)
    assert bad.status_code == 400 and "teff_min" in bad.get_data(as_text=True)


HISTOGRAM_COLUMNS = ["teff", "teff_err", "logg", "logg_err", "feh", "feh_err"]
# obsid -> values put on the bins' edges and outside their ranges (restored afterwards);
# the scaled value of 100015's puts each just below its bin (as numpy, the database must
# compare it with the edges)
EDGE_VALUES = {100015: dict(teff=5900.0, logg=0.3, feh=-2.7, teff_err=290.0, logg_err=0.58,
                            feh_err=0.29),
               100010: dict(teff=8000.0, logg=5.5, feh=-3.0, teff_err=500.0),
               100011: dict(teff=3000.0, logg=-0.5, feh=1.0, teff_err=0.0),
               100012: dict(teff=8000.5, logg=-0.6, feh=-3.2, teff_err=600.0),
               100013: dict(teff=2999.0, logg=5.6, feh=1.5, feh_err=0.75),
               100014: dict(teff=3050.0, logg=4.4, feh=None, logg_err=None)}


@pytest.fixture
def edge_values(pages_db):
    """A few current estimates moved onto the histogram bins' edges, outside their
    ranges and to NULL, for one test."""
    engine = db.make_engine(pages_db)
    names = sorted({name for values in EDGE_VALUES.values() for name in values})
    where = f"model_version = '{CURRENT}' AND obsid = :obsid"
    with engine.begin() as connection:
        saved = {obsid: connection.execute(text(f"SELECT {', '.join(names)} FROM estimates "
                                                f"WHERE {where}"), {"obsid": obsid})
                 .mappings().one() for obsid in EDGE_VALUES}
        for obsid, values in EDGE_VALUES.items():
            connection.execute(text(f"UPDATE estimates SET "
                                    f"{', '.join(f'{n} = :{n}' for n in values)} WHERE {where}"),
                               {**values, "obsid": obsid})
    yield
    with engine.begin() as connection:
        for obsid, values in saved.items():
            connection.execute(text(f"UPDATE estimates SET "
                                    f"{', '.join(f'{n} = :{n}' for n in names)} WHERE {where}"),
                               {**values, "obsid": obsid})
    engine.dispose()


@pytest.mark.parametrize("selection", [
    "", "teff_min=4000&teff_max=6500&feh_max=0", "ra=150&dec=30&radius=0.1",
    "snrg_min=20&exclude_flags=5", f"model_version={RETIRED}&logg_min=2",
    # served by estimate_cells (cells wholly inside, scans of the cut ones)
    "teff_min=4000&teff_max=6000&flags=0", "logg_max=3.5&feh_min=-1.3&exclude_flags=2"])
def test_histograms_count_every_row_of_the_selection_as_numpy_does(client, edge_values,
                                                                   selection):
    """/api/v1/estimates/histograms (counted by the database) equals numpy's histograms of
    every row the same selection returns from /api/v1/estimates, values on bin edges,
    outside the ranges and NULL included."""
    from service.catalogue import HISTOGRAM_BINS

    rows = client.get(f"/api/v1/estimates?{selection}&limit=10000&columns=obsid,"
                      + ",".join(HISTOGRAM_COLUMNS)).json["rows"]
    counted = client.get(f"/api/v1/estimates/histograms?{selection}").json
    assert counted["rows"] == len(rows) > 0
    values = {name: np.array([np.nan if r[name] is None else r[name] for r in rows])
              for name in HISTOGRAM_COLUMNS}
    for name in HISTOGRAM_COLUMNS:
        bins, histogram = HISTOGRAM_BINS[name], counted["histograms"][name]
        x = values[name]
        expected, edges = np.histogram(x[np.isfinite(x)], bins.count, (bins.low, bins.high))
        assert histogram["edges"] == edges.tolist()
        assert histogram["counts"] == expected.tolist(), name
        assert histogram["below"] == int(np.sum(x < bins.low))
        assert histogram["above"] == int(np.sum(x > bins.high))
        assert histogram["missing"] == int(np.sum(np.isnan(x)))
    teff, logg, feh = values["teff"], values["logg"], values["feh"]
    ranges = [(HISTOGRAM_BINS[n].low, HISTOGRAM_BINS[n].high) for n in ("teff", "logg")]
    shape = [HISTOGRAM_BINS[n].count for n in ("teff", "logg")]
    both = np.isfinite(teff) & np.isfinite(logg)
    cells, _, _ = np.histogram2d(teff[both], logg[both], shape, ranges)
    assert np.array(counted["kiel"]["counts"]).tolist() == cells.astype(int).tolist()
    with_feh = both & np.isfinite(feh)
    feh_sum, _, _ = np.histogram2d(teff[with_feh], logg[with_feh], shape, ranges,
                                   weights=feh[with_feh])
    feh_rows, _, _ = np.histogram2d(teff[with_feh], logg[with_feh], shape, ranges)
    mean_feh = np.array([[np.nan if v is None else v for v in row]
                         for row in counted["kiel"]["mean_feh"]])
    with np.errstate(invalid="ignore"):
        expected = feh_sum / feh_rows
    np.testing.assert_allclose(mean_feh, expected, rtol=1e-9, atol=1e-12)
    if not selection:       # the edge values are in this selection
        assert sum(histogram["below"] + histogram["above"]
                   for histogram in counted["histograms"].values()) > 0
        assert counted["histograms"]["teff"]["counts"][-1] >= 1        # 8000 K: last bin


def test_search_page_plots_every_row_of_the_selection(client):
    selection = "teff_min=4000&feh_max=0"
    total = len(client.get(f"/api/v1/estimates?{selection}&limit=10000").json["rows"])
    assert total > 50
    body = page(client, f"/?{selection}&limit=20")
    summary = re.search(r'id="plot-summary">(.*?)</p>', body, re.S).group(1)
    assert f"here {total} rows" in summary
    counts = link(body, "histograms-api")
    assert client.get(urlsplit(counts).path + "?" + urlsplit(counts).query).json["rows"] == total
    for plot in ("kiel-plot", "histograms-plot"):
        image = re.search(rf'<img id="{plot}" src="data:image/png;base64,([^"]+)"', body)
        assert base64.b64decode(image.group(1)).startswith(PNG_MAGIC)


def test_plots_past_the_statement_timeout_leave_the_results(pages_db, monkeypatch):
    """Counting a selection too large for the statement timeout: the page of rows is
    shown with the reason there are no plots, not a 503 for the whole search."""
    from service.blueprints import estimates

    slow = ("SELECT pg_sleep(5)" if pages_db.startswith("postgresql") else
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            "WHERE i < 1000000000) SELECT count(*) FROM n")
    monkeypatch.setattr(estimates, "selection_histograms",
                        lambda connection, *args: connection.execute(text(slow)).all())
    application = make_app(pages_db, statement_timeout_ms=2000)
    try:
        body = page(application.test_client(), "/?teff_min=4000&limit=20")
        assert len(table_obsids(body)) == 20
        problem = re.search(r'id="plot-problem">([^<]*)<', body).group(1)
        assert "statement timeout of 2000 ms" in problem
        assert 'id="kiel-plot"' not in body
    finally:
        application.extensions["lamost_vac"].dispose()


def test_spectrum_page_shows_every_model_version_and_links_the_json(client, app):
    body = page(client, "/spectra/100001")           # in both model versions
    assert f"<td>{CURRENT}</td><td>current</td>" in body
    assert f"<td>{RETIRED}</td><td>retired</td>" in body
    assert 'href="/api/v1/spectra/100001"' in body
    assert "&plusmn;" in body
    # the test catalogue records no spectra root and no loadable artifact: said, not failed
    assert 'id="file-problem"' in body and "no spectra root" in body
    assert 'id="artifact-problem"' in body and "cannot be loaded" in body
    assert "/x.joblib" not in body                   # the artifact's path stays private
    body = page(client, "/spectra/100002")           # estimated by the current model only
    assert RETIRED in body                           # ... and failed in the retired one
    assert "truncated file" in body
    page(client, "/spectra/1", status=404)
    page(client, "/spectra/abc", status=400)
    assert client.get("/api/v1/spectra/100001").json["obsid"] == 100001   # no route clash


def test_spectrum_files_outside_the_root_are_never_opened(pages_db, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.fits"
    outside.write_bytes(b"SIMPLE  =                    T" + b" " * 2850)
    engine = db.make_engine(pages_db)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE spectra SET file_path = '../outside.fits' "
                                    "WHERE obsid = 100003"))
        application = make_app(pages_db, spectra_root=str(root))
        client = application.test_client()
        body = page(client, "/spectra/100003")
        assert "does not lie under the spectra root" in body and "spectrum-plot" not in body
        for path in ("/spectra/100003/spectrum.png", "/spectra/100003/file"):
            response = client.get(path, headers=BROWSER)
            assert response.status_code == 404
            assert b"SIMPLE" not in response.data
        application.extensions["lamost_vac"].dispose()
    finally:
        with engine.begin() as connection:
            connection.execute(text("UPDATE spectra SET file_path = 'spec-100003.fits.gz' "
                                    "WHERE obsid = 100003"))
        engine.dispose()


@pytest.fixture
def evaluated_model(pages_db):
    """The retired model's metrics as training stores them (per-SNRg accuracy of
    out-of-sample predictions, the uncertainty calibration), computed by the training's
    own functions from simulated residuals; restored afterwards."""
    from types import SimpleNamespace

    from etl.training import json_safe
    from models.calibration import ErrorModel
    from models.lasso_mlpnet import LABELS, SNR_BINS
    from models.metrics import accuracy_by_snr
    from models.training import calibration_summary

    rng = np.random.default_rng(11)
    n = 600
    snrg = rng.uniform(5, 80, n)
    reference = {"teff": rng.uniform(4000, 6500, n), "logg": rng.uniform(1, 5, n),
                 "feh": rng.uniform(-1.5, 0.4, n)}
    noise = {"teff": 2000.0, "logg": 3.0, "feh": 1.5}
    predicted = {k: reference[k] + rng.normal(0, noise[k] / snrg) for k in LABELS}
    stars = np.column_stack([predicted[k] for k in LABELS])
    error_models = {k: ErrorModel(SNR_BINS, forms=("bin",)).fit(
        predicted[k] - reference[k], snrg, np.full(n, np.nan), stars) for k in LABELS}
    fitted = SimpleNamespace(snr_bins_=SNR_BINS, error_models_=error_models,
                             calibration_counts_=error_models["teff"].counts_,
                             repeat_scales_={k: None for k in LABELS})
    metrics = json_safe({"cross_fitted": accuracy_by_snr(predicted, reference, snrg),
                          "cross_fitted_stars": n, "calibration": calibration_summary(fitted)})
    engine = db.make_engine(pages_db)
    models = schema.models
    with engine.begin() as connection:
        saved = connection.execute(select(models.c.metrics)
                                   .where(models.c.version == RETIRED)).scalar()
        connection.execute(update(models).where(models.c.version == RETIRED)
                           .values(metrics=metrics))
    yield metrics
    with engine.begin() as connection:
        connection.execute(update(models).where(models.c.version == RETIRED)
                           .values(metrics=saved))
    engine.dispose()


def test_models_page_shows_the_stored_evaluation_with_its_plots(client, evaluated_model):
    from service.blueprints.pages import significant

    body = page(client, "/models")
    retired = body[body.index(f'id="model-{RETIRED}"'):]
    accuracy = evaluated_model["cross_fitted"]
    for label, title in (("teff", "Teff"), ("logg", "log g"), ("feh", "[Fe/H]")):
        for name in ("all", "5-10", "40-80"):
            s = accuracy[label][name]
            row = (f"<td>{name}</td><td>{s['n']}</td><td>{significant(s['mae'])}</td>"
                   f"<td>{significant(s['mu'])}</td><td>{significant(s['sigma'])}</td>")
            assert row in retired, (label, name)
        coverage = evaluated_model["calibration"][label]["coverage"]["within_1"]
        assert f"<td>{100 * coverage[-1]:.1f}%</td>" in html.unescape(retired)
    plots = re.findall(r'<img class="model-plot" id="[^"]+" src="([^"]+)"', retired)
    assert [p.rsplit("/", 1)[1] for p in plots] == ["accuracy.png", "coverage.png"]
    for path in plots:
        response = client.get(path)
        assert response.status_code == 200 and response.mimetype == "image/png"
        assert response.data.startswith(PNG_MAGIC) and len(response.data) > 20_000
    # the current model of the test catalogue stores no per-SNRg summary: no plot, said
    current = body[body.index(f'id="model-{CURRENT}"'):body.index(f'id="model-{RETIRED}"')]
    assert "model-plot" not in current and "stores no per-SNRg accuracy" in current
    assert page(client, f"/models/{CURRENT}/accuracy.png", status=404)
    assert "no model version" in page(client, "/models/v9.9/coverage.png", status=404)
    # a version no model can have (PostgreSQL refuses a NUL in text: it was a 500)
    for version in ("%00", "a%00b", "x" * 65):
        assert "no model version" in page(client, f"/models/{version}/accuracy.png", status=404)


def test_models_and_about_pages(client):
    body = page(client, "/models")
    assert f"{CURRENT} (current)" in body and f"{RETIRED} (retired)" in body
    assert "apogee-payne" in body and "scatter" in body
    body = page(client, "/about")
    for words in ("LASSO", "TOPCAT", "pyvo", "q3c_radial_query", "How to cite",
                  "3500 &le; Teff &le; 6500 K", 'id="histogram-bins"'):
        assert words in body


@pytest.mark.parametrize("method, path, status", [
    ("get", "/?search=1&teff_min=" + "9" * 4100, 414),     # refused before any page runs
    ("post", "/", 405), ("post", "/spectra/100001", 405),
    ("get", "/spectra/100001/plot", 404), ("get", "/about/x", 404),
    ("get", "/models/v2.0/foo.png", 404),
], ids=["long-url", "post-search", "post-spectrum", "no-route", "about-x", "model-plot"])
def test_a_browser_gets_every_error_as_a_page(client, method, path, status):
    """Errors raised before a page runs or by no page (routing) came back as JSON to a
    browser (found by review)."""
    response = getattr(client, method)(path, headers=BROWSER)
    assert response.status_code == status
    assert response.mimetype == "text/html"
    assert b"<html" in response.data.lower()
    # a JSON client still gets JSON, and the JSON API keeps answering in JSON
    assert getattr(client, method)(path).mimetype == "application/json"
    assert client.get("/api/v1/estimates?limit=x", headers=BROWSER).mimetype == \
        "application/json"
    # ... also where no route answers (TOPCAT sends text/html first in its Accept header)
    for method, api_path in (("get", "/api/v1/nonexistent"), ("post", "/api/v1/estimates"),
                             ("put", "/tap/sync"), ("get", "/scs/x")):
        answer = getattr(client, method)(api_path, headers=BROWSER)
        assert answer.status_code in (404, 405) and answer.mimetype != "text/html", api_path


def test_links_are_built_only_for_the_trusted_host_names(pages_db):
    """Every absolute link is built from the request's Host: a forged one was written into
    the pages' API and download links and the /about snippets (found by review)."""
    application = make_app(pages_db, trusted_hosts="vac.example.org, localhost")
    client = application.test_client()
    try:
        for path in ("/about", "/?ra=150&dec=30&radius=1%20arcmin&search=1", "/health"):
            forged = client.get(path, headers={**BROWSER, "Host": "evil.example"})
            assert forged.status_code == 400 and b"evil.example' is not trusted" in forged.data
            for host in ("vac.example.org", "localhost:8000"):
                answer = client.get(path, headers={**BROWSER, "Host": host})
                assert answer.status_code == 200, (path, host)
        about = client.get("/about", headers={**BROWSER, "Host": "vac.example.org"}).data
        assert b"http://vac.example.org/scs" in about
    finally:
        application.extensions["lamost_vac"].dispose()
