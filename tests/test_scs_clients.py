"""Real clients against a live service: pyvo's SCSService and STILTS (cone, tpipe), over
HTTP on 127.0.0.1 (werkzeug server in a thread). votlint and fitsverify check the same
documents in test_release_files.py."""
import csv
import io

import numpy as np
import pytest

from conftest import CURRENT, expected_cone, needs_stilts, service_settings, serving, stilts


@pytest.fixture(scope="module")
def live_url(service_db):
    from service.app import create_app

    url, reader_url, _ = service_db
    app = create_app(service_settings(url, reader_url))
    with serving(app) as base:
        yield base
    app.extensions["lamost_vac"].dispose()


@pytest.fixture
def cat(service_db):
    return service_db[2]


# ---------------------------------------------------------------------------------------
# pyvo
pyvo = pytest.importorskip("pyvo", reason="pyvo not installed (pip install pyvo)")


@pytest.mark.parametrize("ra, dec, radius", [(150.0, 30.0, 0.05), (359.8, 0.0, 0.5),
                                              (10.0, 89.8, 0.4), (250.0, -89.9, 0.3)])
def test_pyvo_cone_search(live_url, cat, ra, dec, radius):
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    service = pyvo.dal.SCSService(f"{live_url}/scs")
    results = service.search(pos=SkyCoord(ra, dec, unit="deg"), radius=radius * u.deg)
    expected_ids, expected_distance = expected_cone(cat, ra, dec, radius)
    assert [int(record.id) for record in results] == expected_ids
    table = results.to_table()
    assert np.allclose(np.asarray(table["distance"]), expected_distance, atol=1e-9, rtol=0)
    centre = SkyCoord(ra, dec, unit="deg")
    for record, distance in zip(results, expected_distance):
        assert record.pos.separation(centre).deg == pytest.approx(distance, abs=1e-9)
    assert set(table["model_version"]) == {CURRENT}
    assert str(table["teff"].unit) == "K"


def test_pyvo_verbosity_and_overflow(live_url, cat):
    service = pyvo.dal.SCSService(f"{live_url}/scs")
    verbose = service.search(pos=(150.0, 30.0), radius=0.01, verbosity=3)
    assert "preprocessing_hash" in verbose.fieldnames
    expected_ids, _ = expected_cone(cat, 150.0, 30.0, 0.1)
    truncated = service.search(pos=(150.0, 30.0), radius=0.1, maxrec=7)
    assert [int(r.id) for r in truncated] == expected_ids[:7]
    # pyvo's SCS results only read the SCS 1.03 "Error" INFO; the DALI overflow INFO is
    # there for DALI-aware clients.
    statuses = [(i.name, i.value) for i in truncated.votable.resources[0].infos]
    assert statuses[0] == ("QUERY_STATUS", "OK") and statuses[-1] == ("QUERY_STATUS",
                                                                       "OVERFLOW")


def test_pyvo_reports_the_service_error_message(live_url):
    from etl.settings import Settings

    service = pyvo.dal.SCSService(f"{live_url}/scs")
    with pytest.raises(pyvo.dal.DALQueryError) as caught:
        service.search(pos=(150.0, 30.0), radius=25.0)
    assert str(caught.value).startswith("SR:")
    assert f"{Settings().scs_max_sr_deg:g}]" in str(caught.value)
    # pyvo writes RA/DEC itself; a bad DEC is sent through its generic DAL query.
    query = pyvo.dal.DALQuery(f"{live_url}/scs", RA=1.0, DEC=95.0, SR=0.1)
    with pytest.raises(pyvo.dal.DALQueryError) as caught:
        pyvo.dal.DALResults(query.execute_votable(), url=query.queryurl)
    assert str(caught.value).startswith("DEC:")


# ---------------------------------------------------------------------------------------
# STILTS
def csv_rows(text):
    return list(csv.DictReader(io.StringIO(text)))


@needs_stilts
def test_stilts_cone_and_tpipe(live_url, cat):
    expected_ids, _ = expected_cone(cat, 0.1, 60.1, 0.3)
    rows = csv_rows(stilts("cone", f"serviceurl={live_url}/scs?", "lon=0.1", "lat=60.1",
                           "radius=0.3", "verb=2", "ofmt=csv", "out=-"))
    assert [int(r["obsid"]) for r in rows] == expected_ids
    # tpipe reads the service's VOTable and FITS outputs by URL.
    query = f"{live_url}/api/v1/estimates?teff_min=6000&limit=20&order=-teff"
    from_votable = csv_rows(stilts("tpipe", f"in={query}&format=votable", "ifmt=votable",
                                   "ofmt=csv", "out=-"))
    from_fits = csv_rows(stilts("tpipe", f"in={query}&format=fits", "ifmt=fits",
                                "ofmt=csv", "out=-"))
    assert len(from_votable) == 20
    assert [r["obsid"] for r in from_votable] == [r["obsid"] for r in from_fits]
    assert all(float(r["teff"]) >= 6000 for r in from_votable)
