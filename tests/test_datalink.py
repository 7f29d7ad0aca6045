"""DataLink (service/blueprints/datalink.py) on a real PostgreSQL catalogue whose spectra
have real LAMOST files (../shared, copied to a temporary spectra root), through the real
clients against a live werkzeug server: the ``{links}`` of an obsid lead to its FITS
file, its PNG preview and its JSON record; STILTS ``datalinklint`` finds no error; pyvo
goes from TAP result rows to the FITS files and previews through the service descriptor
that TAP and cone-search results carry; invalid IDs, unknown obsids and path-traversal
attempts get error rows, never a file."""
import dataclasses
import shutil

import pytest
import requests
from sqlalchemy import text

from etl import db
from conftest import (load_catalogue, make_catalogue, needs_stilts, parse_votable,
                      service_settings, serving, stilts)

pyvo = pytest.importorskip("pyvo", reason="pyvo not installed (pip install pyvo)")
from pyvo.dal.adhoc import DatalinkResults  # noqa: E402

LINKS_MIME = "application/x-votable+xml;content=datalink"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# obsid -> a real LAMOST file (../shared/data/lamost-real): DR8 gzipped, DR7 plain FITS
FILES = {100001: "dr8-repeats/spec-55859-F5902_sp03-232.fits.gz",
         100002: "dr7-plate-HD103621N361936B01/spec-58575-HD103621N361936B01_sp03-002.fits"}
NO_FILE = 100004            # in the catalogue, its file is not on this server
OUTSIDE = 100003            # its recorded file path leads outside the spectra root
SECRET = b"SIMPLE  = T / not to be served: outside the spectra root"


@pytest.fixture(scope="module")
def datalink_db(make_database, shared_dir, tmp_path_factory):
    """A PostgreSQL catalogue; FILES under a spectra root of their own, and a file
    outside the root that spectrum OUTSIDE names (as a tampered catalogue would)."""
    url = make_database("postgresql")
    db.upgrade(url)
    load_catalogue(url, make_catalogue())
    folder = tmp_path_factory.mktemp("datalink")
    root = folder / "spectra"
    for relative in FILES.values():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_dir / "data" / "lamost-real" / relative, root / relative)
    (folder / "secret.fits").write_bytes(SECRET)
    engine = db.make_engine(url)
    with engine.begin() as connection:
        for obsid, relative in [*FILES.items(), (OUTSIDE, "../secret.fits")]:
            connection.execute(text("UPDATE spectra SET file_path = :path WHERE obsid = :obsid"),
                               {"path": relative, "obsid": obsid})
    engine.dispose()
    return url, db.reader_url_for(url), root


def make_app(datalink_db, **changes):
    from service.app import create_app

    url, reader_url, root = datalink_db
    settings = dataclasses.replace(service_settings(url, reader_url), spectra_root=str(root),
                                   **changes)
    return create_app(settings)


@pytest.fixture(scope="module")
def base(datalink_db):
    app = make_app(datalink_db)
    with serving(app) as url:
        yield url
    app.extensions["lamost_vac"].dispose()


def links_of(base, *ids):
    return DatalinkResults.from_result_url(
        f"{base}/datalink/links?" + "&".join(f"ID={i}" for i in ids))


def by_semantics(links, semantics):
    # include_narrower=False: pyvo would otherwise fetch the vocabulary from ivoa.net
    return list(links.bysemantics(semantics, include_narrower=False))


def check_reaches_file_and_preview(links, obsid, root):
    """The #this link of ``links`` serves the spectrum's file byte for byte, as its
    content_type and content_length say; #preview a PNG; #auxiliary the JSON record."""
    (this,) = by_semantics(links, "#this")
    data = (root / FILES[obsid]).read_bytes()
    response = requests.get(this.access_url, timeout=60)
    assert response.status_code == 200 and response.content == data
    assert response.headers["Content-Type"] == this.content_type
    assert this.content_type == ("application/gzip" if FILES[obsid].endswith(".gz")
                                 else "application/fits")
    assert this.content_length == len(data)
    (preview,) = by_semantics(links, "#preview")
    png = requests.get(preview.access_url, timeout=60)
    assert png.status_code == 200 and png.content.startswith(PNG_MAGIC)
    assert png.headers["Content-Type"] == preview.content_type == "image/png"
    (record,) = by_semantics(links, "#auxiliary")
    assert requests.get(record.access_url, timeout=60).json()["obsid"] == obsid


# ---------------------------------------------------------------------------------------
# The {links} endpoint
def test_links_lead_to_the_fits_file_the_preview_and_the_record(base, datalink_db):
    root = datalink_db[2]
    response = requests.get(f"{base}/datalink/links", params={"ID": "100001"}, timeout=60)
    assert response.headers["Content-Type"] == LINKS_MIME
    votable = parse_votable(response.content)
    infos = {(i.name, i.value) for i in votable.resources[0].infos}
    assert {("QUERY_STATUS", "OK"), ("standardID", "ivo://ivoa.net/std/DataLink#links-1.1")} \
        <= infos
    for obsid in FILES:
        links = links_of(base, obsid)
        assert {str(i) for i in links.to_table()["ID"]} == {str(obsid)}
        check_reaches_file_and_preview(links, obsid, root)


# IDs that are no obsid: each gets one UsageFault row, none is ever used as a path.
HOSTILE_IDS = ["../../etc/passwd", "/etc/passwd", "100001/../../../etc/passwd",
               "..\\..\\etc\\passwd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "spec-100001.fits",
               "file:///etc/passwd", "100001.0", "1e5", "0x10", "-1", "\u0661\u0662",
               "99999999999999999999", "100001 OR 1=1", "100001\x00", "\U0001f600"]


def test_invalid_ids_and_traversal_attempts_get_usage_fault_rows(base):
    for method in ("get", "post"):
        params = {"ID": HOSTILE_IDS + ["1"]}
        response = (requests.get if method == "get" else requests.post)(
            f"{base}/datalink/links", timeout=60,
            **({"params": params} if method == "get" else {"data": params}))
        assert response.status_code == 200
        assert b"root:" not in response.content and SECRET not in response.content
        table = parse_votable(response.content).get_first_table().to_table()
        rows = {}
        for row in table:
            rows.setdefault(str(row["ID"]), []).append(row)
        for hostile in HOSTILE_IDS:
            (row,) = rows[hostile.replace("\x00", "")]          # XML holds no NUL
            assert str(row["error_message"]).startswith("UsageFault: ID must be an obsid")
            assert not row["access_url"]
        (unknown,) = rows["1"]
        assert str(unknown["error_message"]) == "NotFoundFault: no spectrum with obsid 1"
    # encoded in the URL itself: the server decodes them to the same refused strings
    for query in ("ID=..%2F..%2Fetc%2Fpasswd", "ID=%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                  "ID=..%252F..%252Fetc%252Fpasswd", "ID=%00100001"):
        response = requests.get(f"{base}/datalink/links?{query}", timeout=60)
        (row,) = parse_votable(response.content).get_first_table().to_table()
        assert str(row["error_message"]).startswith("UsageFault"), query


def test_a_file_outside_the_root_or_missing_is_an_error_row_never_served(base):
    links = links_of(base, OUTSIDE, NO_FILE)
    for obsid, why in [(OUTSIDE, "does not lie under the spectra root"),
                       (NO_FILE, "is not available on this server")]:
        rows = [r for r in links if r.id == str(obsid)]
        assert sorted(r.semantics for r in rows) == ["#auxiliary", "#preview", "#this"]
        for row in rows:
            if row.semantics == "#auxiliary":
                assert row.access_url.endswith(f"/api/v1/spectra/{obsid}")
            else:
                assert row.error_message.startswith("NotFoundFault") and why in \
                    row.error_message and not row["access_url"]
    for path in (f"/spectra/{OUTSIDE}/file", f"/spectra/{OUTSIDE}/spectrum.png",
                 "/spectra/..%2F..%2Fetc%2Fpasswd/file", "/spectra/%2e%2e/file",
                 "/spectra/100001%2F..%2F..%2Fsecret.fits/file"):
        response = requests.get(base + path, timeout=60)
        assert response.status_code in (400, 404), path
        assert SECRET not in response.content and b"root:" not in response.content


def test_response_format_no_id_and_overflow(base, datalink_db):
    for fmt in ("votable", "application/x-votable+xml", LINKS_MIME):
        response = requests.get(f"{base}/datalink/links",
                                params={"ID": "100001", "RESPONSEFORMAT": fmt}, timeout=60)
        assert response.status_code == 200 and response.headers["Content-Type"] == LINKS_MIME
    refused = requests.get(f"{base}/datalink/links", params={"ID": "100001",
                                                             "RESPONSEFORMAT": "csv"}, timeout=60)
    assert refused.status_code == 400
    status = [i for i in parse_votable(refused.content).resources[0].infos
              if i.name == "QUERY_STATUS"][0]
    assert status.value == "ERROR" and status.content.startswith("UsageFault: RESPONSEFORMAT")
    for params in ({}, {"ID": ""}, {"ID": " "}):       # an empty value is no value
        empty = requests.get(f"{base}/datalink/links", params=params, timeout=60)
        assert empty.status_code == 200
        assert len(parse_votable(empty.content).get_first_table().array) == 0

    app = make_app(datalink_db, datalink_max_ids=2)
    try:
        response = app.test_client().post("/datalink/links",
                                          data={"ID": ["100001", "100002", "100005"]})
        votable = parse_votable(response.data)
        ids = {str(i) for i in votable.get_first_table().array["ID"]}
        assert ids == {"100001", "100002"}
        assert [(i.name, i.value) for i in votable.resources[0].infos][-1] == \
            ("QUERY_STATUS", "OVERFLOW")
    finally:
        app.extensions["lamost_vac"].dispose()


@needs_stilts
def test_stilts_datalinklint_reports_no_errors_and_no_warnings(base):
    """A links document with every kind of row: links, a missing file, a file outside
    the root, an unknown obsid and a hostile ID."""
    url = (f"{base}/datalink/links?ID=100001&ID=100002&ID={NO_FILE}&ID={OUTSIDE}&ID=1"
           "&ID=..%2F..%2Fetc%2Fpasswd")
    out = stilts("datalinklint", f"votable={url}")
    assert "Errors: 0; Warnings: 0;" in out and "Failures: 0" in out, out
    assert "Datalink table rows checked: 14" in out, out   # 3 + 3 + 3 + 3 + 1 + 1


# ---------------------------------------------------------------------------------------
# From TAP and cone-search results to the links
def descriptor(votable):
    """(the DataLink service descriptor RESOURCE, the FIELD its ID parameter refers to)."""
    (resource,) = [r for r in votable.resources
                   if r.type == "meta" and r.utype == "adhoc:service"]
    params = {p.name: p.value for p in resource.params}
    assert params["standardID"] == "ivo://ivoa.net/std/DataLink#links-1.1"
    (group,) = resource.groups
    (id_param,) = [p for p in group.entries if p.name == "ID"]
    return params, votable.get_first_table().get_field_by_id(id_param.ref)


def test_tap_and_cone_search_results_carry_the_service_descriptor(base):
    def tap(query, **params):
        response = requests.post(f"{base}/tap/sync", timeout=60,
                                 data={"LANG": "ADQL", "QUERY": query, **params})
        assert response.status_code == 200, response.text[:500]
        return parse_votable(response.content)

    for fmt in ("votable", "binary2"):
        params, field = descriptor(tap("SELECT TOP 3 teff, obsid FROM v_current_estimates",
                                       RESPONSEFORMAT=fmt))
        assert field.name == "obsid" and params["accessURL"] == f"{base}/datalink/links"
    # renamed, or two obsid columns of a join: the first obsid column is referenced
    _, field = descriptor(tap("SELECT TOP 3 e.obsid AS star, e.teff FROM estimates AS e"))
    assert field.name == "star"
    _, field = descriptor(tap("SELECT TOP 3 s.obsid, b.obsid, b.teff FROM spectra AS s "
                              "JOIN v_best_match AS b ON b.obsid = s.obsid"))
    assert field.name == "obsid"
    # no obsid, or something else called obsid: no descriptor
    for query in ("SELECT TOP 3 teff, logg FROM estimates",
                  "SELECT TOP 3 fiberid AS obsid FROM spectra",
                  "SELECT TOP 3 CAST(obsid AS VARCHAR) AS obsid FROM spectra"):
        assert not [r for r in tap(query).resources if r.type == "meta"], query
    cone = requests.get(f"{base}/scs", params={"RA": 150.0, "DEC": 30.0, "SR": 0.01},
                        timeout=60)
    params, field = descriptor(parse_votable(cone.content))
    assert field.name == "obsid" and params["accessURL"] == f"{base}/datalink/links"


def test_pyvo_goes_from_tap_rows_to_their_fits_files_and_previews(base, datalink_db):
    root = datalink_db[2]
    tap = pyvo.dal.TAPService(f"{base}/tap")
    query = ("SELECT obsid, teff FROM v_current_estimates WHERE obsid IN (100001, 100002, "
             f"{NO_FILE}) ORDER BY obsid")
    # preserve_order=True: one links request per row. pyvo's batched mode (one request
    # for all rows) matches the links' ID strings against the rows' values and fails
    # on an integer column such as obsid (pyvo 1.9: TypeError once all are yielded).
    sync_links = list(tap.run_sync(query).iter_datalinks(preserve_order=True))
    job = tap.submit_job(query)
    job.run().wait(timeout=60)
    assert job.phase == "COMPLETED"
    result = job.fetch_result()
    async_links = list(result.iter_datalinks(preserve_order=True))
    job.delete()
    for rows in (sync_links, async_links):
        assert [{int(link.id) for link in links} for links in rows] == \
            [{100001}, {100002}, {NO_FILE}]
        for links, obsid in zip(rows, FILES):
            check_reaches_file_and_preview(links, obsid, root)
        assert by_semantics(rows[2], "#this")[0].error_message.startswith("NotFoundFault")
    check_reaches_file_and_preview(result[1].getdatalink(), 100002, root)


def test_capabilities_list_tap_and_datalink(base):
    import xml.etree.ElementTree as ET

    def capabilities(path):
        document = ET.fromstring(requests.get(base + path, timeout=60).content)
        return {c.get("standardID"): c.find("interface/accessURL").text
                for c in document.findall("capability")}

    for path in ("/tap/capabilities", "/capabilities"):
        found = capabilities(path)
        assert found["ivo://ivoa.net/std/TAP"] == f"{base}/tap", path
        assert found["ivo://ivoa.net/std/DataLink#links-1.1"] == f"{base}/datalink/links"
