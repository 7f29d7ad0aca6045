"""How /api/v1/estimates reads a page on PostgreSQL (issue 15): the shapes it accepts use
the sort indexes of migration 0003 in the order of their ORDER BY (NULLS order and obsid
tiebreaker included); a selection small enough is sorted; anything that cannot be read
within the rows budget (LAMOST_VAC_API_MAX_ROWS_READ) is refused with a 400 that names
the parameter to narrow -- up front, from the planner's estimates, without reading the
catalogue.

The test catalogue is small (3,000 spectra), so plans are checked with the planner told
to avoid sequential scans and sorts (``enable_seqscan``/``enable_sort`` off): an index
that does not match the ORDER BY still leaves a Sort in the plan. The budget is set low
in the tests that need a selection "larger than the budget"."""
import contextlib
import math

import numpy as np
import pytest
from sqlalchemy import event

from conftest import (CURRENT, N_SPECTRA, RETIRED, load_catalogue, make_catalogue,
                      service_settings, with_test_limits)
from etl import db
from service.blueprints import estimates as api
from service.openapi import ParamError, parse


@pytest.fixture(scope="module")
def catalogue(make_database):
    """The test catalogue, but with log g following Teff as in real catalogues (the cool
    stars are the giants), which the planner, taking columns as independent, does not
    know."""
    url = make_database("postgresql")
    db.upgrade(url)
    cat = make_catalogue()
    noise = np.random.default_rng(7).normal(0, 0.3, N_SPECTRA)
    cat["logg"] = np.clip(0.5 + 4.5 * (cat["teff"] - 3800) / 3700 + noise, 0.5, 5.0)
    load_catalogue(url, cat)
    return url, cat


@pytest.fixture(scope="module")
def make_app(catalogue):
    """``make_app(budget)``: the service on the test catalogue with that rows budget."""
    from service.app import create_app

    url, _ = catalogue
    apps = {}

    def make(budget):
        if budget not in apps:
            settings = with_test_limits(service_settings(url, db.reader_url_for(url)),
                                        api_max_rows_read=budget)
            apps[budget] = create_app(settings)
            apps[budget].config["TESTING"] = True
        return apps[budget]

    yield make
    for application in apps.values():
        application.extensions["lamost_vac"].dispose()


def arguments(app, query):
    from urllib.parse import parse_qsl

    from werkzeug.datastructures import MultiDict

    return parse(api.parameters(app.extensions["lamost_vac"].limits),
                 MultiDict(parse_qsl(query)))


def plans(app, query, **planner):
    """The read path of ``query`` and the plan of each statement a page runs (the part
    with sort values and, for a nullable sort column, the part with NULLs), with the
    planner settings ``planner`` (e.g. ``enable_seqscan="off"``)."""
    args = arguments(app, query)
    engine = app.extensions["lamost_vac"].engine
    with engine.connect() as connection:
        version = api.resolve_model_version(connection, args["model_version"])
        path = api.read_path(connection, args, version,
                             app.extensions["lamost_vac"].limits.api_max_rows_read)
        for name, value in planner.items():
            connection.exec_driver_sql(f"SET {name} = {value}")
        try:
            out = []
            for nulls in api.page_parts(args):
                statement = api.build_query(connection, args, version,
                                            list(api.DEFAULT_COLUMNS), nulls=nulls, path=path)
                compiled = statement.compile(connection)
                out.append("\n".join(connection.exec_driver_sql(
                    f"EXPLAIN {compiled.string}", compiled.construct_params()).scalars()))
        finally:
            for name in planner:
                connection.exec_driver_sql(f"RESET {name}")
    return path, out


def cursor_for(order, value, obsid):
    return api.encode_cursor(order, value, obsid)


# ---------------------------------------------------------------------------------------
# Accepted shapes follow the sort indexes
SORT_INDEX = {"teff": "ix_estimates_model_version_teff_obsid",
              "logg": "ix_estimates_model_version_logg_obsid",
              "feh": "ix_estimates_model_version_feh_obsid",
              "snrg": "ix_spectra_snrg_obsid"}


@pytest.mark.parametrize("name", list(SORT_INDEX))
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("deep", [False, True])
def test_each_order_is_read_from_its_index_in_order(make_app, name, descending, deep):
    """Both directions, first and deep pages (keyset cursor): an Index Scan of the
    column's index, forwards or backwards, and no Sort -- the ORDER BY (direction,
    NULLS order, obsid tiebreaker) is the index's."""
    order = f"-{name}" if descending else name
    query = f"order={order}&limit=100"
    if deep:
        query += f"&cursor={cursor_for(order, 5000.0 if name == 'teff' else 1.5, 101234)}"
    path, statements = plans(make_app(10_000), query, enable_seqscan="off", enable_sort="off")
    assert path.kind == api.PLAIN
    values = statements[0]
    assert SORT_INDEX[name] in values and "Index" in values, values
    assert ("Backward" in values) == descending, values
    assert "Sort" not in values.replace("Sort Key", ""), values
    if deep:        # the cursor is an index condition, not a filter over earlier rows
        assert "ROW(" in values.split("Index Cond:")[1].splitlines()[0], values
    for nulls in statements[1:]:    # the NULLs last, by obsid, from the same index
        assert "IS NULL" in nulls and "Sort" not in nulls.replace("Sort Key", ""), nulls


@pytest.mark.parametrize("order", ["obsid", "-obsid"])
def test_obsid_order_is_read_from_the_estimates_key(make_app, order):
    path, [plan] = plans(make_app(10_000), f"order={order}", enable_seqscan="off",
                         enable_sort="off")
    assert "uq_estimates_obsid_model_version" in plan and "Sort" not in plan, plan


def test_walk_reads_the_index_in_order_for_at_most_the_budget(make_app):
    """A filter on another column over a large selection: the sort index is walked for at
    most the budget's rows (a Limit right above the index scan), filtered afterwards."""
    budget = 400
    path, [plan, _] = plans(make_app(budget), "order=-teff&logg_min=1.2&limit=20",
                            enable_seqscan="off", enable_sort="off")
    assert path.kind == api.WALK and path.walk_rows == budget
    assert SORT_INDEX["teff"] in plan and "Backward" in plan, plan
    assert "Sort" not in plan.replace("Sort Key", ""), plan
    limits = [line for line in plan.splitlines() if "Limit" in line]
    assert len(limits) == 2, plan       # the page's, and the walk's


def test_small_selection_is_read_through_its_narrowest_range(make_app):
    """Ordered by a column without an index, a selection within the budget is read
    through the narrowest indexed range and sorted."""
    path, [plan] = plans(make_app(10_000), "order=ra&feh_max=-2.3&teff_min=4000",
                         enable_seqscan="off")
    assert path.kind == api.SORT
    assert "Bitmap Index Scan on ix_estimates_model_version_feh_obsid" in plan, plan


# ---------------------------------------------------------------------------------------
# Every path returns the same rows, in order, page after page
def expected_rows(cat, keep, name, descending):
    """obsids of the current model's estimates that ``keep`` accepts, in API order."""
    values = {"teff": np.where(cat["teff_null"], np.nan, cat["teff"]), "logg": cat["logg"],
              "feh": cat["feh"], "snrg": cat["snrg"], "obsid": cat["obsid"]}[name]
    rows = [i for i in range(N_SPECTRA) if keep(i)]
    with_value = sorted((i for i in rows if not math.isnan(values[i])),
                        key=lambda i: (values[i], cat["obsid"][i]), reverse=descending)
    nulls = sorted((i for i in rows if math.isnan(values[i])),
                   key=lambda i: cat["obsid"][i], reverse=descending)
    return [int(cat["obsid"][i]) for i in with_value + nulls]


@pytest.mark.parametrize("budget, kind", [(10_000, api.SORT), (400, api.WALK),
                                          (10_000, api.PLAIN)])
@pytest.mark.parametrize("order", ["teff", "-teff", "snrg", "-obsid"])
def test_pages_walk_every_row_once_in_order(make_app, catalogue, budget, kind, order):
    _, cat = catalogue
    app = make_app(budget)
    name, descending = order.lstrip("-"), order.startswith("-")
    if kind == api.PLAIN:
        query, keep = "", (lambda i: True)
    else:
        query, keep = "&feh_min=-2&exclude_flags=4", \
            (lambda i: cat["feh"][i] >= -2 and not cat["flags"][i] & 4)
    args = arguments(app, f"order={order}{query}")
    with app.extensions["lamost_vac"].engine.connect() as connection:
        assert api.read_path(connection, args, CURRENT, budget).kind == kind
    client = app.test_client()
    url, seen = f"/api/v1/estimates?order={order}{query}&limit=97&columns=obsid", []
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.get_json()
        seen += [row["obsid"] for row in response.get_json()["rows"]]
        url = response.get_json()["next"]
    assert seen == expected_rows(cat, keep, name, descending)


# ---------------------------------------------------------------------------------------
# Refused shapes: 400 naming the parameter, before anything is read
@contextlib.contextmanager
def statements_run(app):
    """Every SQL statement the service's engine runs inside the block."""
    engine = app.extensions["lamost_vac"].engine
    seen = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.mark.parametrize("query, parameter, words", [
    ("order=ra", "order", "order=ra has no index"),
    ("order=-teff_err&snrg_min=10", "order", "order by one of obsid, snrg, teff, logg, feh"),
    ("order=-snrg&logg_min=3&feh_min=0", "logg_min", "order by a column you filter on "
                                                     "(logg, feh)"),
    ("order=teff&teff_err_max=85", "teff_err_max", "too sparse in that order"),
])
def test_slow_shapes_are_refused_up_front_naming_the_parameter(make_app, query, parameter,
                                                                 words):
    app = make_app(300)
    with statements_run(app) as statements:
        response = app.test_client().get(f"/api/v1/estimates?{query}")
    assert response.status_code == 400
    document = response.get_json()
    assert document["parameter"] == parameter and words in document["error"], document
    assert "300" in document["error"] and "cone (ra, dec, radius)" in document["error"]
    # Only the model version was looked up, plans estimated and the selection counted in
    # estimate_cells: no row of the catalogue was read.
    reads = [s for s in statements if not s.lstrip().startswith("EXPLAIN")
             and "FROM estimate_cells" not in s]
    assert len(reads) == 1 and "FROM models" in reads[0], statements


def hottest_first(cat):
    """Indexes of the catalogue's estimates with a Teff in ``order=-teff`` (ties by obsid)."""
    order = np.lexsort((-cat["obsid"], -np.where(cat["teff_null"], -np.inf, cat["teff"])))
    return order[~cat["teff_null"][order]]


def walk_statements(statements):
    return [s for s in statements if "_walked" in s]


def test_a_walk_whose_scout_finds_too_few_rows_is_refused_there(make_app, catalogue):
    """The planner takes filters as independent of the order; when they are not (the
    hottest stars are no giants), the first eighth of the budget shows it: the page is
    refused after that scout, with the rows it found, without walking the rest."""
    _, cat = catalogue
    budget = 300
    scout = -(-budget // api.SCOUT_SHARE)
    app = make_app(budget)
    query = "order=-teff&logg_max=1.6&limit=5"
    args = arguments(app, query)
    with app.extensions["lamost_vac"].engine.connect() as connection:
        assert api.read_path(connection, args, CURRENT, budget).kind == api.WALK
    passes = cat["logg"][hottest_first(cat)] <= 1.6
    assert passes[:scout].sum() * budget < 5 * scout       # too few at the scout's rate
    with statements_run(app) as statements:
        response = app.test_client().get(f"/api/v1/estimates?{query}")
    assert response.status_code == 400
    document = response.get_json()
    assert document["parameter"] == "logg_max", document
    assert (f"{passes[:scout].sum()} of the first {scout} rows pass logg_max, so fewer than "
            f"a page (5 rows) of the first {budget} would:") in document["error"], document
    assert len(walk_statements(statements)) == 1


def test_a_walk_goes_on_from_its_scout_to_the_end_of_the_budget(make_app, catalogue):
    """A scout whose rate could fill the page within the budget is followed by the rest
    of the walk, from the scout's last row: the page is the first rows of the whole
    selection in order, none lost or repeated at the seam."""
    _, cat = catalogue
    budget, limit = 300, 15
    scout = -(-budget // api.SCOUT_SHARE)
    app = make_app(budget)
    order = hottest_first(cat)
    passes = cat["feh"][order] <= -2.0
    assert passes[:scout].sum() * budget >= (limit + 1) * scout
    assert scout < np.flatnonzero(passes)[limit] < budget        # filled after the scout
    with statements_run(app) as statements:
        response = app.test_client().get(
            f"/api/v1/estimates?order=-teff&feh_max=-2&limit={limit}&columns=obsid")
    assert response.status_code == 200, response.get_json()
    document = response.get_json()
    got = [row["obsid"] for row in document["rows"]]
    assert got == cat["obsid"][order[passes]][:limit].tolist()
    assert len(walk_statements(statements)) == 2 and document["next"]


def test_a_scout_short_of_the_rate_still_reads_an_order_that_ends_within_the_budget(
        make_app, catalogue):
    """Near the end of the order (and in its part of NULL Teffs) fewer rows remain than
    the budget: the walk would not be cut, so a scout's low rate is no reason to refuse --
    the rest is read and the short last page answered (found by review)."""
    _, cat = catalogue
    budget, limit = 300, 50
    scout = -(-budget // api.SCOUT_SHARE)
    app = make_app(budget)
    order = hottest_first(cat)
    at = order[-151]                                    # 150 rows with a Teff remain
    passes = cat["logg"][order[-150:]] >= 4.0
    assert passes[:scout].sum() * budget < limit * scout
    nulls = np.flatnonzero(cat["teff_null"])
    nulls = nulls[np.argsort(-cat["obsid"][nulls])]     # order=-teff: NULLs by obsid, descending
    expected = [*cat["obsid"][order[-150:][passes]], *cat["obsid"][nulls[cat["logg"][nulls] >= 4.0]]]
    assert 0 < len(expected) < limit
    cursor = cursor_for("-teff", float(cat["teff"][at]), int(cat["obsid"][at]))
    response = app.test_client().get(f"/api/v1/estimates?order=-teff&logg_min=4&limit={limit}"
                                     f"&columns=obsid&cursor={cursor}")
    assert response.status_code == 200, response.get_json()
    document = response.get_json()
    assert [row["obsid"] for row in document["rows"]] == expected and document["next"] is None


def test_a_walk_cut_by_the_budget_after_its_scout_is_refused(make_app, catalogue):
    """The scout's rate may promise more than the rest of the walk keeps (from this cursor
    on, the dwarfs thin out as Teff falls): the page is refused once the budget is walked."""
    _, cat = catalogue
    budget, limit = 300, 50
    scout = -(-budget // api.SCOUT_SHARE)
    app = make_app(budget)
    order = hottest_first(cat)
    at = order[799]
    cursor = cursor_for("-teff", float(cat["teff"][at]), int(cat["obsid"][at]))
    query = f"order=-teff&logg_min=4&limit={limit}&cursor={cursor}"
    passes = cat["logg"][order[800:]] >= 4.0
    assert passes[:scout].sum() * budget >= (limit + 1) * scout
    assert passes[:budget].sum() < limit + 1
    args = arguments(app, query)
    with app.extensions["lamost_vac"].engine.connect() as connection:
        assert api.read_path(connection, args, CURRENT, budget).kind == api.WALK
    with statements_run(app) as statements:
        response = app.test_client().get(f"/api/v1/estimates?{query}")
    assert response.status_code == 400
    document = response.get_json()
    assert document["parameter"] == "logg_min", document
    assert f"fewer than a page ({limit} rows) of the first {budget} rows pass logg_min:" \
        in document["error"], document
    assert len(walk_statements(statements)) == 2


def test_a_cone_or_a_page_in_index_order_is_never_estimated(make_app):
    app = make_app(1)       # nothing would pass the budget
    client = app.test_client()
    for query in ("order=-teff&teff_max=6000", "order=ra&ra=150&dec=30&radius=0.2",
                  "feh_max=-1&ra=150&dec=30&radius=0.2", f"model_version={RETIRED}&order=feh"):
        with statements_run(app) as statements:
            response = client.get(f"/api/v1/estimates?{query}")
        assert response.status_code == 200, (query, response.get_json())
        assert not [s for s in statements if s.lstrip().startswith("EXPLAIN")], query


def test_search_page_shows_the_refusal_next_to_the_field(make_app):
    app = make_app(300)
    response = app.test_client().get("/?logg_min=3&feh_min=0&search=1",
                                     headers={"Accept": "text/html"})
    assert response.status_code == 400
    assert "too sparse in that order" in response.data.decode()


def test_read_path_raises_param_error_for_unindexed_orders(make_app):
    app = make_app(300)
    args = arguments(app, "order=dec")
    with app.extensions["lamost_vac"].engine.connect() as connection:
        with pytest.raises(ParamError) as refused:
            api.read_path(connection, args, CURRENT, 300)
    assert refused.value.name == "order"


def test_search_page_plots_read_their_rows_without_the_budget(make_app):
    """The listing is a page of the API (read within the budget); the plots' 10,000 rows
    of the selection are read as one statement, as before the budget existed."""
    app = make_app(300)
    response = app.test_client().get("/?feh_min=-2&search=1", headers={"Accept": "text/html"})
    assert response.status_code == 200
    assert response.data.decode().count("data:image/png;base64,") == 2
