"""estimate_cells: the histogram counts the database keeps per cell (etl/histogram_cells.py)
follow every kind of write, and the histograms they give equal those of a scan of the
same selection (tests/test_pages.py compares both with numpy)."""
import numpy as np
import pytest
from sqlalchemy import event, func, insert, select, text

from conftest import CURRENT, NOW, RETIRED, load_catalogue, make_catalogue
from etl import db, histogram_cells, schema
from etl.inference import ESTIMATE_COLUMNS, write_rows
from service import catalogue
from service.catalogue import RANGE_COLUMNS, selection_histograms


@pytest.fixture
def loaded(catalogue_engine, catalogue_url):
    load_catalogue(catalogue_url, make_catalogue())
    return catalogue_engine


def kept_cells(connection):
    """{key: (n, feh_n, feh_sum)} of estimate_cells, keys whose counts are zero left out
    (a cell emptied by deletes keeps its row, its [Fe/H] sum a rounding residue)."""
    return {tuple(row[:8]): (row[8], row[9], row[10])
            for row in connection.execute(select(schema.estimate_cells)).all()
            if row[8] or row[9] or abs(row[10]) > 1e-9}


def counted_now(connection):
    """The same, counted from the estimates as they are now."""
    postgres = db.is_postgres(connection)
    source = (f"(SELECT 1 AS sign, {', '.join(histogram_cells.COUNTED_COLUMNS)} "
              "FROM estimates) AS source")
    return {tuple(row[:8]): (row[8], row[9], row[10]) for row in connection.execute(
        text(histogram_cells.counted_rows_sql(source, postgres))).all()}


def assert_cells_are_counts(engine):
    with engine.connect() as connection:
        kept, expected = kept_cells(connection), counted_now(connection)
    assert sorted(set(kept) ^ set(expected)) == []
    for key, (n, feh_n, feh_sum) in expected.items():
        assert kept[key][:2] == (n, feh_n), key
        assert kept[key][2] == pytest.approx(feh_sum, rel=1e-9, abs=1e-9), key


def estimate_rows(obsids, teff):
    return [dict(obsid=int(obsid), model_version=CURRENT, teff=teff, teff_err=70.0,
                 teff_err_model=30.0, logg=4.49, logg_err=0.1, logg_err_model=0.05,
                 feh=None, feh_err=None, feh_err_model=None, flags=8, code_version="t",
                 preprocessing_hash="p", run_id="r", created_at=NOW) for obsid in obsids]


def test_cells_follow_every_write(loaded):
    """Bulk insert, the workers' upserts (new rows and replaced ones), UPDATE, DELETE and
    TRUNCATE all leave estimate_cells equal to a count of the estimates."""
    assert_cells_are_counts(loaded)
    with loaded.connect() as connection:
        n_current = connection.execute(text(
            "SELECT sum(n) FROM estimate_cells WHERE histogram = 0 AND model_version = :v"),
            {"v": CURRENT}).scalar_one()
    assert n_current == 3000
    with loaded.begin() as connection:
        connection.execute(insert(schema.spectra), [dict(
            obsid=900000 + k, ra=10.0, dec=10.0, zone=db.zone_of(10.0), class_="STAR",
            data_version="t") for k in range(30)])
        rows = estimate_rows(range(900000, 900030), 5012.5) \
            + estimate_rows(range(100001, 100031), None)        # replaces 30 rows
        assert set(rows[0]) == set(ESTIMATE_COLUMNS)
        write_rows(connection, CURRENT, "r", rows, {})
    assert_cells_are_counts(loaded)
    with loaded.begin() as connection:
        connection.execute(text("UPDATE estimates SET teff = teff + 260, feh = feh - 0.3, "
                                "flags = flags | 16 WHERE obsid % 3 = 0"))
    assert_cells_are_counts(loaded)
    with loaded.begin() as connection:
        connection.execute(text("DELETE FROM estimates WHERE model_version = :v"),
                           {"v": RETIRED})
        connection.execute(text("DELETE FROM estimates WHERE obsid % 7 = 0"))
    assert_cells_are_counts(loaded)
    with loaded.begin() as connection:
        if db.is_postgres(connection):
            connection.execute(text("TRUNCATE spectra CASCADE"))
        else:
            connection.execute(text("DELETE FROM estimates"))
    with loaded.connect() as connection:
        assert kept_cells(connection) == {}


def selection(**bounds):
    args = {f"{name}_{end}": None for name in RANGE_COLUMNS for end in ("min", "max")}
    args.update(flags=None, exclude_flags=0)
    args.update(bounds)
    return args


def statements(engine):
    seen = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: seen.append(statement))
    return seen


def as_lists(counted):
    return ({name: (h.counts.tolist(), h.below, h.above, h.missing)
             for name, h in counted.histograms.items()},
            counted.rows, counted.kiel_counts.tolist())


def scan_only(connection, args, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(catalogue, "_cells_wholly_inside", lambda args, cone: None)
        return selection_histograms(connection, args, CURRENT, None)


def test_selections_on_cell_edges_read_only_the_cells(loaded, monkeypatch):
    """Lower bounds on cell edges (an upper bound is inclusive: the values equal to it
    lie in the next cell) and flags are answered from estimate_cells alone; the answer is
    the scan's."""
    seen = statements(loaded)
    for args in (selection(), selection(teff_min=4000.0, flags=0),
                 selection(logg_min=2.0, feh_min=-0.25, exclude_flags=5)):
        with loaded.connect() as connection:
            seen.clear()
            counted = selection_histograms(connection, args, CURRENT, None)
            assert len(seen) == 1 and "estimate_cells" in seen[0], seen
            assert "estimates " not in seen[0].replace("estimate_cells", "")
            assert as_lists(counted) == as_lists(scan_only(connection, args, monkeypatch))


def test_cells_and_slabs_equal_a_scan_for_any_bounds(loaded, monkeypatch):
    """Random bounds (cutting cells, on cell edges, on the values themselves, outside the
    ranges) with and without flags: the cells plus the scan of the cut cells equal a scan
    of the whole selection, [Fe/H] means included."""
    rng = np.random.default_rng(3)
    cell_edges = {name: cell.bins.edges[::histogram_cells.CELL_WIDTH]
                  for name, cell in histogram_cells.CELLS.items()}
    with loaded.begin() as connection:        # rows on cell edges, where the slabs begin
        for k in range(60):
            connection.execute(text(
                "UPDATE estimates SET teff = :teff, logg = :logg, feh = :feh "
                "WHERE obsid = :obsid"),
                {"obsid": 100001 + k, **{name: float(rng.choice(edges))
                                         for name, edges in cell_edges.items()}})
    with loaded.connect() as connection:
        values = {name: [v for (v,) in connection.execute(text(
            f"SELECT {name} FROM estimates WHERE {name} IS NOT NULL LIMIT 50"))]
            for name in histogram_cells.CELL_AXES}
    for trial in range(60):
        bounds = {}
        for name in histogram_cells.CELL_AXES:
            cell = histogram_cells.CELLS[name]
            choices = [None, float(rng.choice(cell_edges[name])),
                       float(rng.choice(values[name])),
                       float(rng.uniform(cell.bins.low - 1, cell.bins.high + 1))]
            low, high = (choices[k] for k in rng.integers(0, 4, 2))
            if low is not None and high is not None and low > high:
                low, high = high, low
            bounds.update({f"{name}_min": low, f"{name}_max": high})
        flags = [dict(), dict(flags=int(rng.choice([0, 1, 5]))),
                 dict(exclude_flags=int(rng.choice([1, 4])))][trial % 3]
        args = selection(**bounds, **flags)
        with loaded.connect() as connection:
            counted = selection_histograms(connection, args, CURRENT, None)
            scanned = scan_only(connection, args, monkeypatch)
        assert as_lists(counted) == as_lists(scanned), args
        np.testing.assert_allclose(counted.kiel_mean_feh, scanned.kiel_mean_feh,
                                   rtol=1e-9, atol=1e-12)


def selected_rows(connection, args):
    return connection.execute(select(func.count()).select_from(schema.estimates).where(
        *catalogue.selection_conditions(connection, args, CURRENT, None))).scalar_one()


def test_cells_bound_the_rows_of_a_selection(loaded):
    """selection_rows_at_most (the WALK path's estimate of how many rows pass its filters)
    is never below the rows selected, equals them for lower bounds on cell edges, and
    declines selections the cells cannot count."""
    rng = np.random.default_rng(5)
    with loaded.connect() as connection:
        for trial in range(40):
            bounds = {}
            for name in rng.choice(histogram_cells.CELL_AXES, 2, replace=False):
                bins = histogram_cells.HISTOGRAM_BINS[name]
                low, high = sorted(rng.uniform(bins.low - 0.1 * (bins.high - bins.low),
                                               bins.high, 2))
                bounds.update({f"{name}_min": float(low),
                               f"{name}_max": None if trial % 2 else float(high)})
            flags = dict(exclude_flags=1) if trial % 3 == 0 else {}
            args = selection(**bounds, **flags)
            assert catalogue.selection_rows_at_most(connection, args, CURRENT) \
                >= selected_rows(connection, args), args
        for args in (selection(teff_min=4500.0, feh_min=-0.5), selection(logg_min=4.0),
                     selection(teff_min=5000.0, logg_min=3.5, flags=0)):
            assert catalogue.selection_rows_at_most(connection, args, CURRENT) \
                == selected_rows(connection, args) > 0, args
        assert catalogue.selection_rows_at_most(connection, selection(snrg_min=20.0),
                                                CURRENT) is None
        assert catalogue.selection_rows_at_most(connection, selection(), CURRENT,
                                                cone=(10.0, 10.0, 1.0)) is None


def test_db_maintain_counts_the_cells_again(loaded, catalogue_url):
    """After estimates were written with the triggers off (here: cells lost),
    ``lamost-vac db maintain --recount-histograms`` makes the cells the counts again."""
    from etl.cli import main

    with loaded.begin() as connection:
        connection.execute(text("DELETE FROM estimate_cells WHERE histogram = 0"))
        connection.execute(text("UPDATE estimate_cells SET n = n + 1 WHERE histogram = 1"))
    with pytest.raises(AssertionError):
        assert_cells_are_counts(loaded)
    assert main(["db", "maintain", "--recount-histograms", "--url", catalogue_url]) == 0
    assert_cells_are_counts(loaded)
