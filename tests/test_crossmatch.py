"""Cross-match of spectra with reference labels (q3c_join on PostgreSQL, astropy on
SQLite): the best match is the true star, never a decoy 2-6 arcsec away."""
import csv

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord, match_coordinates_sky, search_around_sky
from sqlalchemy import select, text

from etl import schema
from etl.crossmatch import CrossmatchOptions, crossmatch, match_pairs
from etl.ingest import LabelsIngestOptions, SpectraIngestOptions, ingest_labels, ingest_spectra


@pytest.fixture
def loaded_simulated_set(catalogue_engine, simulated_set):
    ingest_spectra(catalogue_engine, SpectraIngestOptions(
        catalogue=str(simulated_set / "lamost_catalog.csv"), spectra_root=str(simulated_set)))
    ingest_labels(catalogue_engine, LabelsIngestOptions(
        path=str(simulated_set / "apogee_payne.fits")))
    return catalogue_engine


def positions(engine):
    with engine.connect() as connection:
        spectra = connection.execute(select(schema.spectra.c.obsid, schema.spectra.c.ra,
                                            schema.spectra.c.dec)).all()
        labels = connection.execute(select(schema.reference_labels.c.apogee_id,
                                           schema.reference_labels.c.ra,
                                           schema.reference_labels.c.dec,
                                           schema.reference_labels.c.teff)).all()
    return spectra, labels


def test_best_match_agrees_with_astropy_and_finds_the_true_star(loaded_simulated_set,
                                                                simulated_set):
    engine = loaded_simulated_set
    summary = crossmatch(engine, CrossmatchOptions(radius_arcsec=3.0))
    spectra, labels = positions(engine)
    spectra_coords = SkyCoord([s.ra for s in spectra] * u.deg, [s.dec for s in spectra] * u.deg)
    label_coords = SkyCoord([lab.ra for lab in labels] * u.deg,
                            [lab.dec for lab in labels] * u.deg)
    nearest, separation, _ = match_coordinates_sky(spectra_coords, label_coords)
    with engine.connect() as connection:
        best = {r.obsid: r for r in connection.execute(text(
            "SELECT obsid, apogee_id, separation_arcsec, teff FROM v_best_match"))}
        ranks = connection.execute(text(
            "SELECT match_rank, count(*) FROM crossmatch GROUP BY match_rank")).all()
    expected = {s.obsid: (labels[k].apogee_id, sep) for s, k, sep
                in zip(spectra, nearest, separation.to_value(u.arcsec)) if sep <= 3.0}
    assert set(best) == set(expected) and len(best) == len(spectra)
    for obsid, (apogee_id, sep) in expected.items():
        assert best[obsid].apogee_id == apogee_id
        assert best[obsid].separation_arcsec == pytest.approx(sep, abs=1e-6)
    # All pairs within the radius are stored (decoys as rank 2), like search_around_sky.
    pairs = search_around_sky(spectra_coords, label_coords, 3.0 * u.arcsec)[0]
    assert sum(count for _, count in ranks) == len(pairs) == summary.loaded
    # The best match carries the star's true labels, never a decoy's.
    with open(simulated_set / "truth.csv", newline="") as handle:
        truth = {int(r["obsid"]): float(r["teff"]) for r in csv.DictReader(handle)}
    assert all(best[obsid].teff == pytest.approx(truth[obsid]) for obsid in best)


def test_decoys_only_appear_as_lower_ranks(loaded_simulated_set):
    engine = loaded_simulated_set
    crossmatch(engine, CrossmatchOptions(radius_arcsec=6.5))
    with engine.connect() as connection:
        worst_best = connection.execute(text(
            "SELECT max(separation_arcsec) FROM crossmatch WHERE match_rank = 1")).scalar()
        decoys = connection.execute(text(
            "SELECT min(separation_arcsec), count(*) FROM crossmatch WHERE match_rank > 1")).one()
    assert worst_best < 1.5
    assert decoys[1] > 0 and decoys[0] > worst_best


def test_crossmatch_is_idempotent_and_follows_the_radius(loaded_simulated_set):
    engine = loaded_simulated_set
    first = crossmatch(engine, CrossmatchOptions(radius_arcsec=6.5))
    with engine.connect() as connection:
        before = connection.execute(text(
            "SELECT * FROM crossmatch ORDER BY obsid, label_id")).all()
    again = crossmatch(engine, CrossmatchOptions(radius_arcsec=6.5))
    assert (again.loaded, again.updated, again.removed) == (0, 0, 0)
    assert again.unchanged == first.loaded
    with engine.connect() as connection:
        assert connection.execute(text(
            "SELECT * FROM crossmatch ORDER BY obsid, label_id")).all() == before
    smaller = crossmatch(engine, CrossmatchOptions(radius_arcsec=1.5))
    assert smaller.removed > 0
    with engine.connect() as connection:
        assert connection.execute(text(
            "SELECT max(separation_arcsec) FROM crossmatch")).scalar() <= 1.5


def test_match_pairs_across_ra_zero_and_near_the_pole():
    spectra = [(1, 359.9999, 10.0), (2, 45.0, 89.9999)]
    labels = [(10, "s", "A", 0.0002, 10.0), (11, "s", "B", 225.0, 89.9995),
              (12, "s", "C", 45.0, 89.9990)]
    rows = match_pairs(spectra, labels, radius_arcsec=3.0)
    found = {(r[0], r[3]): (r[4], r[5]) for r in rows}
    assert set(found) == {(1, "A"), (2, "B")}
    assert found[(1, "A")][0] == pytest.approx(0.0003 * 3600 * np.cos(np.radians(10)), rel=1e-3)
    assert found[(2, "B")] == (pytest.approx(2.16, abs=0.01), 1)
