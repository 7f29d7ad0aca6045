"""ETL ingest of spectra and reference labels, on SQLite and PostgreSQL (same tests)."""
import argparse
import csv
import gzip
import hashlib
import json
import shutil
import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from sqlalchemy import insert, select, text

from etl import schema
from etl.ingest import (NO_OBSID_REASON, LabelsIngestOptions, SpectraIngestOptions,
                        ingest_labels, ingest_spectra)


def run_cli(url, *argv):
    """Run an ``ingest`` command through the CLI parser; returns (exit code)."""
    from etl.commands import db as commands

    parser = argparse.ArgumentParser(prog="lamost-vac")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv) + ["--url", url])
    return args.func(args)


def url_of(engine):
    return engine.url.render_as_string(hide_password=False)


def table_rows(engine, table, order_by):
    with engine.connect() as connection:
        return [tuple(r) for r in connection.execute(select(table).order_by(*order_by))]


def quarantine_rows(engine):
    with engine.connect() as connection:
        return connection.execute(select(
            schema.quarantine.c.source_file, schema.quarantine.c.source_row,
            schema.quarantine.c.obsid, schema.quarantine.c.reason)).all()


@pytest.fixture(scope="session")
def real_dir(shared_dir):
    return shared_dir / "data" / "lamost-real"


# --------------------------------------------------------------------------------------
def test_every_real_file_is_ingested_or_quarantined(catalogue_engine, real_dir):
    dr1_catalogue = real_dir / "dr1-plate-B6212" / "dr1_afgk_catalog_rows.csv"
    code = run_cli(url_of(catalogue_engine), "ingest", "spectra", str(dr1_catalogue),
                   "--spectra-root", str(real_dir))
    assert code == 0
    files = sorted(str(p.relative_to(real_dir)) for p in real_dir.rglob("*.fits*"))
    assert len(files) == 496
    with catalogue_engine.connect() as connection:
        stored = dict(connection.execute(select(schema.spectra.c.file_path,
                                                schema.spectra.c.obsid)).all())
        layouts = dict(connection.execute(select(schema.spectra.c.file_path,
                                                 schema.spectra.c.layout)).all())
    quarantined = {row.source_file: row.reason for row in quarantine_rows(catalogue_engine)
                   if row.source_row == 0}
    for relative in files:
        absolute = str(real_dir / relative)
        assert (relative in stored) != (absolute in quarantined), relative
    assert len(stored) == 451
    assert set(quarantined.values()) == {NO_OBSID_REASON}
    assert all(p.startswith("dr1-plate-B6212/") for p in quarantined.__iter__() for p in
               [p.split("lamost-real/")[1]])
    # DR1 files (no OBSID in the header) got their obsid from the catalogue, by file name.
    with open(dr1_catalogue, newline="") as handle:
        by_name = {row["filename"]: int(row["obsid"]) for row in csv.DictReader(handle)}
    dr1 = {p: o for p, o in stored.items() if p.startswith("dr1-plate-B6212/")}
    assert len(dr1) == 131
    assert all(by_name[p.split("/")[-1]] == obsid for p, obsid in dr1.items())
    assert {layouts[p] for p in dr1} == {"dr1-image"}
    assert {layouts[p] for p in stored if p not in dr1} == {"dr8-image"}
    # Catalogue rows whose file is not on this plate are quarantined, not lost silently.
    missing = [r for r in quarantine_rows(catalogue_engine) if r.source_row > 0]
    assert len(missing) == 3165 - 131
    assert all(r.reason.startswith("spectrum file not found") for r in missing)


def test_headers_only_ingest_of_dr8_repeats(catalogue_engine, real_dir):
    root = real_dir / "dr8-repeats"
    code = run_cli(url_of(catalogue_engine), "ingest", "spectra", "--spectra-root", str(root))
    assert code == 0
    with catalogue_engine.connect() as connection:
        count, with_snr = connection.execute(text(
            "SELECT count(*), count(snrg) FROM spectra")).one()
    assert count == with_snr == 220


def test_another_file_claiming_a_stored_obsid_is_quarantined(catalogue_engine, real_dir, tmp_path):
    """A file whose header claims the obsid of a stored spectrum re-pointed it (path,
    hash, position) with only "1 updated" said (found by review). It is quarantined; the
    same file at a new path (an archive moved) still updates the row."""
    import shutil

    first, second = sorted((real_dir / "dr8-repeats").glob("*.fits.gz"))[:2]
    root1, root2, root3 = (tmp_path / name for name in ("root1", "root2", "root3"))
    for root in (root1, root2, root3):
        root.mkdir()
    shutil.copy(first, root1 / first.name)
    url = url_of(catalogue_engine)
    assert run_cli(url, "ingest", "spectra", "--spectra-root", str(root1)) == 0
    (stored_before,) = table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid])
    obsid = fits.getheader(first)["OBSID"]
    with fits.open(second) as hdus:                      # another star, claiming that obsid
        hdus[0].header["OBSID"] = obsid
        hdus.writeto(root2 / "spec-claims-it.fits")
    assert run_cli(url, "ingest", "spectra", "--spectra-root", str(root2)) == 1
    assert table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]) == [stored_before]
    (reason,) = [r.reason for r in quarantine_rows(catalogue_engine)
                 if r.source_file.endswith("spec-claims-it.fits")]
    assert reason == f"obsid already stored from another file: {obsid} is {first.name}"
    shutil.copy(first, root3 / "spec-moved.fits.gz")          # the same bytes elsewhere
    assert run_cli(url, "ingest", "spectra", "--spectra-root", str(root3)) == 0
    with catalogue_engine.connect() as connection:
        assert connection.execute(select(schema.spectra.c.file_path)).scalar_one() == "spec-moved.fits.gz"


def test_simulated_catalogue_with_relative_filenames(catalogue_engine, simulated_set):
    summary = ingest_spectra(catalogue_engine, SpectraIngestOptions(
        catalogue=str(simulated_set / "lamost_catalog.csv"), spectra_root=str(simulated_set)))
    with open(simulated_set / "lamost_catalog.csv", newline="") as handle:
        catalogue = {int(r["obsid"]): r for r in csv.DictReader(handle)}
    assert (summary.loaded, summary.quarantined) == (len(catalogue), 0)
    for row in table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]):
        values = dict(zip([c.name for c in schema.spectra.columns], row))
        expected = catalogue[values["obsid"]]
        assert values["file_path"] == expected["filename"]
        assert values["ra"] == pytest.approx(float(expected["ra"]), abs=1e-9)
        assert values["class"] == "STAR"
        raw = (simulated_set / expected["filename"]).read_bytes()
        assert values["file_size"] == len(raw)
        assert values["file_sha256"] == hashlib.sha256(raw).hexdigest()
        assert values["layout"] in ("dr8-image", "dr8-v2-table")
        assert values["data_version"] == "LAMOST DR8"


def test_second_run_changes_nothing(catalogue_engine, simulated_set):
    options = SpectraIngestOptions(catalogue=str(simulated_set / "lamost_catalog.csv"),
                                   spectra_root=str(simulated_set))
    first = ingest_spectra(catalogue_engine, options)
    before = table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid])
    second = ingest_spectra(catalogue_engine, options)
    assert first.loaded == len(before) > 0
    assert (second.loaded, second.updated, second.unchanged) == (0, 0, len(before))
    assert table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]) == before
    # Header-only ingest of the same files finds the same data: still nothing changes.
    third = ingest_spectra(catalogue_engine, SpectraIngestOptions(
        spectra_root=str(simulated_set)))
    assert (third.loaded, third.updated, third.quarantined) == (0, 0, 0)
    assert table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]) == before


@pytest.fixture
def bad_input(simulated_set, tmp_path):
    """A copy of the simulated set plus a catalogue with one of each kind of bad row."""
    root = tmp_path / "root"
    shutil.copytree(simulated_set / "spectra", root / "spectra")
    with open(simulated_set / "lamost_catalog.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    good, victims = rows[:-3], rows[-3:]
    truncated = dict(victims[0])
    path = root / truncated["filename"]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))         # truncated FITS data
    bad_ra = dict(victims[1], ra="12h30m")                          # non-numeric RA
    duplicate = dict(good[0], ra=str(float(good[0]["ra"]) + 1))     # duplicate obsid
    missing = dict(victims[2], obsid="123456789", filename="spectra/nowhere/spec-1-X_sp01-001.fits.gz")
    good_catalogue = tmp_path / "good.csv"
    bad_catalogue = tmp_path / "bad.csv.gz"
    with open(good_catalogue, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(good)
    with gzip.open(bad_catalogue, "wt", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(good + [truncated, bad_ra, duplicate, missing])
    return root, good_catalogue, bad_catalogue, len(good)


def test_bad_input_is_quarantined_and_nothing_stored_is_lost(catalogue_engine, bad_input):
    root, good_catalogue, bad_catalogue, n_good = bad_input
    url = url_of(catalogue_engine)
    assert run_cli(url, "ingest", "spectra", str(good_catalogue), "--spectra-root", str(root),
                   "--unreferenced", "ignore") == 0
    before = table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid])
    assert len(before) == n_good

    assert run_cli(url, "ingest", "spectra", str(bad_catalogue), "--spectra-root", str(root),
                   "--unreferenced", "ignore") == 0
    assert table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]) == before
    reasons = sorted((row.source_row, row.reason.split(":")[0].split(" (")[0])
                     for row in quarantine_rows(catalogue_engine))
    assert reasons == [
        (n_good + 1, "unreadable spectrum file"),
        (n_good + 2, "non-numeric ra"),
        (n_good + 3, "duplicate obsid"),
        (n_good + 4, "spectrum file not found"),
    ]
    truncated_reason = [r.reason for r in quarantine_rows(catalogue_engine)
                        if r.source_row == n_good + 1][0]
    assert "truncated" in truncated_reason
    # The truncated file met without a catalogue row (header ingest) is quarantined too.
    assert run_cli(url, "ingest", "spectra", "--spectra-root", str(root)) == 0
    assert any(r.source_row == 0 and "truncated" in r.reason
               for r in quarantine_rows(catalogue_engine))
    after = table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid])
    assert set(before) <= set(after) and len(after) == n_good + 2   # + the two good files


def test_exit_code_is_non_zero_only_when_nothing_loads(catalogue_engine, tmp_path):
    catalogue = tmp_path / "all_bad.csv"
    catalogue.write_text("obsid,ra,dec\n1,abc,10\n2,20,-95\n")
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(catalogue),
                   "--metadata-only") == 1
    catalogue.write_text("obsid,ra,dec\n1,abc,10\n2,20,-45\n")
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(catalogue),
                   "--metadata-only") == 0


def test_a_fits_catalogue_with_array_columns_is_refused_naming_the_column(catalogue_engine,
                                                                          tmp_path, capsys):
    """A 2-D obsid column was a TypeError traceback (found by review); nothing is stored."""
    before = table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid])
    path = tmp_path / "c_2d.fits"
    Table({"obsid": np.array([[1, 2], [3, 4]]), "ra": [10.0, 11.0], "dec": [1.0, 2.0]}).write(path)
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(path), "--metadata-only") == 1
    err = capsys.readouterr().err
    assert "c_2d.fits: column 'obsid' holds an array of 2 values a row" in err
    assert "Traceback" not in err
    assert table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]) == before


def test_a_fits_catalogue_with_a_logical_column_is_refused_naming_the_column(catalogue_engine,
                                                                           tmp_path, capsys):
    """A logical RA column was stored as RA 1.0 / 0.0 deg (found by review)."""
    before = table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid])
    path = tmp_path / "c_bool.fits"
    Table({"obsid": [991, 992], "ra": [True, False], "dec": [1.0, 2.0]}).write(path)
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(path), "--metadata-only") == 1
    err = capsys.readouterr().err
    assert "c_bool.fits: column 'ra' is logical (T/F)" in err
    assert "Traceback" not in err
    assert table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]) == before


def test_blank_integer_cells_of_a_fits_table_are_missing_not_their_tnull(catalogue_engine,
                                                                         tmp_path, capsys):
    """A blank (TNULL) integer cell read as its TNULL number: lmjd 999999 overwrote a stored
    55001, a blank fiberid quarantined its row as 'fiberid out of range: 16959', a blank
    good_flag was stored as 16959 (found by review)."""
    from astropy.table import MaskedColumn

    good = good_catalogue_rows(2, first_obsid=3_000_000_001)
    first = write_csv_bytes(tmp_path / "first.csv.gz", good)
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(first), "--metadata-only") == 0
    path = tmp_path / "blank-cells.fits"
    Table({"obsid": [int(r["obsid"]) for r in good], "ra": [180.0, 180.01], "dec": [30.0, 30.0],
           "lmjd": MaskedColumn([58000, 58001], mask=[True, False]),
           "fiberid": MaskedColumn(np.array([100, 101], dtype=np.int16), mask=[False, True]),
           }).write(path)
    assert fits.getheader(path, 1)["TNULL4"] == 999999         # what astropy writes for them
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(path), "--metadata-only") == 0
    assert "0 quarantined" in capsys.readouterr().out
    with catalogue_engine.connect() as connection:
        stored = dict(connection.execute(text(
            "SELECT obsid, lmjd FROM spectra WHERE obsid >= 3000000001")).all())
    assert stored[int(good[1]["obsid"])] == 58001
    assert stored[int(good[0]["obsid"])] in (None, 58000)      # blank: missing, never 999999

    labels = tmp_path / "labels.fits"
    Table({"APOGEE_ID": ["2M1", "2M2"], "RA": [10.0, 11.0], "DEC": [1.0, 2.0],
           "TEFF": [5000.0, 5100.0], "LOGG": [4.5, 4.4], "FE_H": [0.0, 0.1],
           "GOOD_FLAG": MaskedColumn(np.array([1, 1], dtype=np.int16), mask=[False, True])}
          ).write(labels)
    assert run_cli(url_of(catalogue_engine), "ingest", "labels", str(labels)) == 0
    with catalogue_engine.connect() as connection:
        flags = dict(connection.execute(text(
            "SELECT apogee_id, good_flag FROM reference_labels WHERE label_set = 'labels'")).all())
    assert flags == {"2M1": 1, "2M2": None}


def test_changed_estimate_inputs_make_the_spectrum_stale_again(catalogue_engine, tmp_path):
    """Re-ingesting a spectrum with another redshift or class kept its estimates: the old
    rest frame's estimate was served as current, a spectrum now a GALAXY was served for
    ever, and a failure for a missing z was never retried once z came (found by review)."""
    from etl.ingest import utcnow

    rows = good_catalogue_rows(4, first_obsid=4_000_000_001)
    for row, z in zip(rows, ("0.0001", "0.0001", "-9999", "0.0002")):
        row["z"] = z
    first = tmp_path / "first.csv.gz"
    write_csv_bytes(first, rows, fields=CATALOGUE_FIELDS + ["z"])
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(first), "--metadata-only") == 0
    obsids = [int(r["obsid"]) for r in rows]
    version, now = f"stale-test-{catalogue_engine.dialect.name}", utcnow()
    with catalogue_engine.begin() as connection:
        connection.execute(insert(schema.models).values(
            version=version, created_at=now, artifact_path="/nowhere.joblib",
            artifact_sha256="0" * 64, training_set={}, status="retired"))
        for obsid in (obsids[0], obsids[1], obsids[3]):
            connection.execute(insert(schema.estimates).values(
                obsid=obsid, model_version=version, teff=5800.0, code_version="0",
                preprocessing_hash="0", run_id="r", created_at=now))
        connection.execute(insert(schema.estimate_failures).values(
            obsid=obsids[2], model_version=version, stage="preprocess",
            reason="no usable redshift", run_id="r", created_at=now))
    rows[0]["z"] = "0.0009"                 # another rest frame
    rows[1]["class"] = "GALAXY"             # no longer a star
    rows[2]["z"] = "0.0001"                 # a usable redshift at last
    rows[3]["designation"] = "J120003.00+300000.1"      # not an input of the estimate
    second = tmp_path / "second.csv.gz"
    write_csv_bytes(second, rows, fields=CATALOGUE_FIELDS + ["z"])
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(second), "--metadata-only") == 0
    with catalogue_engine.connect() as connection:
        kept = connection.execute(select(schema.estimates.c.obsid).where(
            schema.estimates.c.model_version == version)).scalars().all()
        failures = connection.execute(select(schema.estimate_failures.c.obsid).where(
            schema.estimate_failures.c.model_version == version)).scalars().all()
    assert kept == [obsids[3]] and failures == []


def test_two_registrations_at_once_are_taken_in_turn(catalogue_engine, tmp_path):
    """The second of two concurrent registrations on PostgreSQL waited on the first's
    retirement of the current row, then inserted a second current model: refused by the
    one-current index after its whole training (found by review)."""
    import threading

    from sqlalchemy import update

    from etl.ingest import utcnow
    from etl.registry import register_model

    if catalogue_engine.dialect.name != "postgresql":
        pytest.skip("SQLite takes one writer at a time anyway")
    models = schema.models
    register_model(catalogue_engine, "reg-v1", tmp_path / "v1.joblib", "1" * 64, {}, {})
    outcome = []

    def second_registration():
        try:
            register_model(catalogue_engine, "reg-v3", tmp_path / "v3.joblib", "3" * 64, {}, {},
                           activate="now")
            outcome.append("registered")
        except Exception as error:  # noqa: BLE001 -- the outcome is what is checked
            outcome.append(repr(error))

    with catalogue_engine.connect() as first:       # a registration still in its transaction
        first.execute(update(models).where(models.c.status == "current").values(status="retired"))
        first.execute(insert(models).values(version="reg-v2", created_at=utcnow(),
                                            artifact_path=str(tmp_path / "v2.joblib"),
                                            artifact_sha256="2" * 64, training_set={},
                                            status="current"))
        thread = threading.Thread(target=second_registration)
        thread.start()
        with catalogue_engine.connect() as watcher:     # the second is waiting on the first
            for _ in range(200):
                if watcher.exec_driver_sql("SELECT count(*) FROM pg_locks WHERE NOT granted").scalar():
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the second registration never waited for the first")
        first.commit()
    thread.join(30)
    assert outcome == ["registered"]
    with catalogue_engine.connect() as connection:
        assert dict(connection.execute(select(models.c.version, models.c.status)).all()) == {
            "reg-v1": "retired", "reg-v2": "retired", "reg-v3": "current"}


def test_a_new_version_is_served_only_once_it_has_estimated_every_spectrum(catalogue_engine,
                                                                           tmp_path, capsys):
    """Registering a model made it current at once: until the whole catalogue was
    re-estimated (about 11 hours at DR8 size) the API, TAP and export served only the part
    it had estimated (found by review). A version registered while another is current now
    waits as pending until it has an estimate of every spectrum the current one serves."""
    from sqlalchemy.exc import IntegrityError

    from etl.cli import main
    from etl.ingest import utcnow
    from etl.registry import (activate_model, model_to_estimate, promote_pending, register_model,
                              withdraw_model)

    rows = good_catalogue_rows(4, first_obsid=4_100_000_001)
    catalogue = tmp_path / "catalogue.csv.gz"
    write_csv_bytes(catalogue, rows[:3])
    url = url_of(catalogue_engine)
    assert run_cli(url, "ingest", "spectra", str(catalogue), "--metadata-only") == 0
    obsids = [int(r["obsid"]) for r in rows]
    models, now = schema.models, utcnow()

    def register(version, **options):
        return register_model(catalogue_engine, version, tmp_path / f"{version}.joblib", "0" * 64,
                              {}, {}, **options)

    def statuses():
        with catalogue_engine.connect() as connection:
            found = dict(connection.execute(select(models.c.version, models.c.status)).all())
        return {v: s for v, s in found.items() if s != "retired"}

    def estimated(version, estimates=(), failures=()):
        with catalogue_engine.begin() as connection:
            for obsid in estimates:
                connection.execute(schema.estimate_failures.delete().where(
                    schema.estimate_failures.c.obsid == obsid,
                    schema.estimate_failures.c.model_version == version))
                connection.execute(insert(schema.estimates).values(
                    obsid=obsid, model_version=version, teff=5800.0, code_version="0",
                    preprocessing_hash="0", run_id="r", created_at=now))
            for obsid in failures:
                connection.execute(insert(schema.estimate_failures).values(
                    obsid=obsid, model_version=version, stage="read", reason="unreadable",
                    run_id="r", created_at=now))

    def served():
        with catalogue_engine.connect() as connection:
            return connection.execute(text("SELECT model_version, count(*) FROM v_current_estimates "
                                           "GROUP BY model_version")).all()

    assert register("p-v1") == "current"           # nothing is served yet: current at once
    estimated("p-v1", obsids[:3])
    assert register("p-v2") == "pending"
    assert statuses() == {"p-v1": "current", "p-v2": "pending"}
    with catalogue_engine.connect() as connection:
        assert model_to_estimate(connection)["version"] == "p-v2"       # what infer and the beat use
    estimated("p-v2", obsids[:1], failures=obsids[1:2])
    promotion = promote_pending(catalogue_engine)
    assert (promotion.version, promotion.promoted, promotion.missing, promotion.failed) == ("p-v2", False, 2, 1)
    assert not promotion.blocked_by_failures() and served() == [("p-v1", 3)]
    assert register("p-v3") == "pending"           # replaces the pending one, not the current
    assert statuses() == {"p-v1": "current", "p-v3": "pending"}
    # a spectrum the current version serves failed with the new one: it stays pending,
    # and says why and what to do, rather than take that spectrum out of the catalogue
    estimated("p-v3", obsids[:2], failures=obsids[2:3])
    promotion = promote_pending(catalogue_engine)
    assert promotion.blocked_by_failures() and "models activate p-v3" in promotion.text()
    assert statuses() == {"p-v1": "current", "p-v3": "pending"} and served() == [("p-v1", 3)]
    estimated("p-v3", obsids[2:3])                 # retried with success
    assert promote_pending(catalogue_engine).promoted
    assert statuses() == {"p-v3": "current"} and served() == [("p-v3", 3)]
    assert promote_pending(catalogue_engine).version is None
    # a spectrum that arrives meanwhile, served by nobody yet, does not hold a version back
    write_csv_bytes(catalogue, rows)
    assert run_cli(url, "ingest", "spectra", str(catalogue), "--metadata-only") == 0
    assert register("p-v4") == "pending"
    estimated("p-v4", obsids[:3])
    assert promote_pending(catalogue_engine).promoted and statuses() == {"p-v4": "current"}
    # roll back to a retired version, and withdraw a pending one, from the command line
    assert register("p-v5") == "pending"
    assert main(["models", "activate", "p-v1", "--url", url]) == 0
    assert statuses() == {"p-v1": "current"} and served() == [("p-v1", 3)]
    assert register("p-v6") == "pending"
    assert main(["models", "withdraw", "p-v6", "--url", url]) == 0
    assert statuses() == {"p-v1": "current"}
    capsys.readouterr()
    assert main(["models", "withdraw", "p-v1", "--url", url]) == 2
    assert "p-v1 is current: only a pending version can be withdrawn" in capsys.readouterr().err
    assert main(["models", "activate", "p-nope", "--url", url]) == 2
    assert "'p-nope' is not registered" in capsys.readouterr().err
    assert main(["models", "list", "--json", "--url", url]) == 0
    listed = {row["version"]: row for row in json.loads(capsys.readouterr().out)}
    assert {v: (r["status"], r["estimates"], r["failures"]) for v, r in listed.items()} == {
        "p-v1": ("current", 3, 0), "p-v2": ("retired", 1, 1), "p-v3": ("retired", 3, 0),
        "p-v4": ("retired", 3, 0), "p-v5": ("retired", 0, 0), "p-v6": ("retired", 0, 0)}
    with catalogue_engine.connect() as connection:
        assert model_to_estimate(connection)["version"] == "p-v1"
    with pytest.raises(ValueError, match="activate"):
        register("p-v7", activate="later")
    assert register("p-v8", activate="now") == "current"
    assert statuses() == {"p-v8": "current"}
    activate_model(catalogue_engine, "p-v1")
    with pytest.raises(ValueError, match="not registered"):
        withdraw_model(catalogue_engine, "p-nope")
    # the schema itself holds at most one pending version, and no other status
    assert register("p-v9") == "pending"
    for version, status in (("p-v10", "pending"), ("p-v11", "training")):
        with pytest.raises(IntegrityError), catalogue_engine.begin() as connection:
            connection.execute(insert(models).values(
                version=version, created_at=now, artifact_path="/nowhere.joblib",
                artifact_sha256="0" * 64, training_set={}, status=status))


def test_crashed_ingest_resumes(catalogue_engine, simulated_set, monkeypatch):
    import etl.ingest as ingest

    options = SpectraIngestOptions(catalogue=str(simulated_set / "lamost_catalog.csv"),
                                   spectra_root=str(simulated_set), batch_rows=4)
    real_write = ingest._write_batch
    calls = []

    def crash_on_second_batch(batch, summary):
        calls.append(1)
        if len(calls) == 2:
            batch.connection.close()        # what dying in the middle of it does
            raise RuntimeError("simulated crash")
        return real_write(batch, summary)

    monkeypatch.setattr(ingest, "_write_batch", crash_on_second_batch)
    with pytest.raises(RuntimeError):
        ingest_spectra(catalogue_engine, options)
    monkeypatch.setattr(ingest, "_write_batch", real_write)
    with catalogue_engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM spectra")).scalar() == 4
        assert connection.execute(text("SELECT status FROM ingest_runs")).scalar() == "failed"
    summary = ingest_spectra(catalogue_engine, options)
    assert summary.unchanged == 4 and summary.loaded == summary.read - 4


def test_fits_catalogue_and_metadata_only(catalogue_engine, simulated_set, tmp_path):
    from astropy.table import Table

    table = Table.read(simulated_set / "lamost_catalog.csv", format="ascii.csv")
    table.rename_columns(table.colnames, [c.upper() for c in table.colnames])
    table.remove_columns(["SNRZ", "DESIGNATION", "FILENAME"])         # optional columns
    path = tmp_path / "catalogue.fits.gz"
    table.write(path)
    summary = ingest_spectra(catalogue_engine, SpectraIngestOptions(
        catalogue=str(path), spectra_root=str(simulated_set)))
    assert summary.loaded == len(table) and summary.quarantined == 0   # by standard name
    metadata_only = ingest_spectra(catalogue_engine, SpectraIngestOptions(
        catalogue=str(path), metadata_only=True))
    # Missing columns and file-less rows never erase what is stored.
    assert (metadata_only.updated, metadata_only.unchanged) == (0, len(table))
    with catalogue_engine.connect() as connection:
        assert connection.execute(text(
            "SELECT count(*) FROM spectra WHERE file_sha256 IS NULL")).scalar() == 0


# --------------------------------------------------------------------------------------
def test_labels_payne_layout(catalogue_engine, simulated_set):
    path = simulated_set / "apogee_payne.fits"
    assert run_cli(url_of(catalogue_engine), "ingest", "labels", str(path)) == 0
    data = fits.getdata(path)
    with catalogue_engine.connect() as connection:
        stored = {r.apogee_id: r for r in connection.execute(select(schema.reference_labels))}
    assert len(stored) == len(data)
    for row in data:
        label = stored[row["APOGEE_ID"].strip()]
        assert label.teff == pytest.approx(row["payne"][0])
        assert label.logg == pytest.approx(row["payne"][1])
        assert label.feh == pytest.approx(row["payne"][19])
        assert label.good_flag == row["good_flag"]
        assert label.label_set == "apogee_payne"
    again = ingest_labels(catalogue_engine, LabelsIngestOptions(path=str(path)))
    assert (again.loaded, again.updated, again.unchanged) == (0, 0, len(data))


def test_labels_payne_with_too_few_entries_is_refused_naming_the_file(catalogue_engine, tmp_path,
                                                                     capsys):
    """A payne column narrower than PAYNE_INDEX asks for was an IndexError (found by review)."""
    table = Table({"APOGEE_ID": ["2M01", "2M02"], "RA": [10.0, 11.0], "DEC": [1.0, 2.0],
                   "payne": np.array([[5000.0, 4.5, 0.0], [4800.0, 2.5, -0.3]])})
    path = tmp_path / "payne3.fits"
    table.write(path)
    assert run_cli(url_of(catalogue_engine), "ingest", "labels", str(path)) == 1
    err = capsys.readouterr().err
    assert "payne3.fits" in err and "has 3 entries a row; feh is expected at index 19" in err
    assert "Traceback" not in err


def test_labels_payne_missing_values_are_null(catalogue_engine, simulated_set, tmp_path):
    data = fits.getdata(simulated_set / "apogee_payne.fits").copy()
    data["payne"][0, 0] = -9999.0
    data["RA"][1] = np.nan
    path = tmp_path / "payne_missing.fits"
    fits.BinTableHDU(data).writeto(path)
    summary = ingest_labels(catalogue_engine, LabelsIngestOptions(path=str(path)))
    assert summary.quarantined == 1 and summary.loaded == len(data) - 1
    with catalogue_engine.connect() as connection:
        teff = connection.execute(select(schema.reference_labels.c.teff).where(
            schema.reference_labels.c.apogee_id == data["APOGEE_ID"][0].strip())).scalar()
    assert teff is None


def test_labels_flat_columns(catalogue_engine, shared_dir, tmp_path):
    cannon = shared_dir / "data" / "labels" / "cannon_lamost_dr2_x_apogee_dr12.fits"
    url = url_of(catalogue_engine)
    assert run_cli(url, "ingest", "labels", str(cannon)) == 1          # no [Fe/H] column
    assert run_cli(url, "ingest", "labels", str(cannon),
                   "--columns", "teff=TEFF,logg=LOGG,feh=PARAM_M_H") == 0
    data = fits.getdata(cannon, ext=1)
    with catalogue_engine.connect() as connection:
        count, good = connection.execute(text(
            "SELECT count(*), sum(good_flag) FROM reference_labels")).one()
        feh = connection.execute(select(schema.reference_labels.c.feh).where(
            schema.reference_labels.c.apogee_id == data["APOGEE_ID"][0].strip())).scalar()
    assert count == len(data) and good == len(data)
    assert feh == pytest.approx(data["PARAM_M_H"][0])
    flat = tmp_path / "flat.csv"
    flat.write_text("APOGEE_ID,RA,DEC,Teff,Logg,FeH\n2M0001,10.0,20.0,5000,4.5,-0.2\n"
                    "2M0002,11.0,21.0,4800,,0.1\n")
    summary = ingest_labels(catalogue_engine, LabelsIngestOptions(path=str(flat)))
    assert summary.loaded == 2
    with catalogue_engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT apogee_id, teff, logg, feh, good_flag FROM reference_labels "
            "WHERE label_set = 'flat' ORDER BY apogee_id")).all()
    assert [tuple(r) for r in rows] == [("2M0001", 5000.0, 4.5, -0.2, 1),
                                        ("2M0002", 4800.0, None, 0.1, 0)]


# --------------------------------------------------------------------------------------
# Hostile input: one bad value costs one row, never a batch or the run.
CATALOGUE_FIELDS = ["obsid", "designation", "ra", "dec", "lmjd", "spid", "fiberid", "class",
                    "subclass"]


def good_catalogue_rows(count, first_obsid=1_000_000_001):
    return [{"obsid": str(first_obsid + k), "designation": f"J1200{k:02d}.00+300000.0",
             "ra": f"{180 + k * 0.01:.6f}", "dec": "30.0", "lmjd": "58000", "spid": "8",
             "fiberid": str(100 + k), "class": "STAR", "subclass": "G2"}
            for k in range(count)]


def write_csv_bytes(path, rows, fields=CATALOGUE_FIELDS):
    """A gzipped CSV from rows of field values (str, or bytes written as they are)."""
    lines = [",".join(fields).encode()]
    for row in rows:
        lines.append(b",".join(value if isinstance(value, bytes) else value.encode()
                               for value in (row[name] for name in fields)))
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return path


def assert_quarantined(engine, source_file, expected):
    """``expected``: {source_row: text its reason must contain}; nothing else quarantined."""
    found = {row.source_row: row for row in quarantine_rows(engine)}
    assert sorted(found) == sorted(expected), [(r.source_row, r.reason) for r in found.values()]
    for source_row, wanted in expected.items():
        assert found[source_row].source_file == str(source_file)
        assert wanted in found[source_row].reason, (source_row, found[source_row].reason)


# Each bad row: (column, raw value, text the quarantine reason must contain).
HOSTILE_CSV_VALUES = [
    ("spid", "99999", "spid out of range [1, 16]: '99999'"),
    ("designation", "J" * 40, "designation longer than 32 characters"),
    ("lmjd", "1e12", "lmjd out of range"),
    ("obsid", "9223372036854775808", "obsid out of range"),           # 2**63: beyond int64
    ("obsid", "-5", "obsid out of range"),
    ("ra", "400", "ra out of range [0.0, 360.0]"),
    ("dec", "-95", "dec out of range"),
    ("fiberid", "0", "fiberid out of range [1, 250]"),
    ("spid", "1.5", "non-integer spid"),
    ("obsid", "\u0661\u0662", "non-numeric obsid"),                    # Arabic-Indic digits
    ("class", "S" * 17, "class longer than 16 characters"),
    ("subclass", "G2\x00V", "subclass contains a NUL character"),
    ("designation", b"J12\xff\xfe", "designation is not valid UTF-8: b'J12\\xff\\xfe'"),
    ("ra", b"1\xe90", "ra is not valid UTF-8"),
    ("subclass", "x" * 200_000, "unreadable CSV row (line "),        # over the csv limit
]


def test_hostile_csv_values_cost_one_row_each(catalogue_engine, tmp_path, capsys):
    good = good_catalogue_rows(6)
    bad_rows = []
    for number, (column, value, _) in enumerate(HOSTILE_CSV_VALUES):
        bad = good_catalogue_rows(1, first_obsid=2_000_000_000 + number)[0]
        bad[column] = value
        bad_rows.append(bad)
    rows = good[:3] + bad_rows + good[3:]                  # bad rows among good ones
    expected = {4 + k: reason for k, (_, _, reason) in enumerate(HOSTILE_CSV_VALUES)}
    catalogue = write_csv_bytes(tmp_path / "hostile.csv.gz", rows)
    code = run_cli(url_of(catalogue_engine), "ingest", "spectra", str(catalogue),
                   "--metadata-only")
    output = capsys.readouterr()
    assert code == 0
    assert "Traceback" not in output.out + output.err
    assert (f"{len(good)} loaded" in output.out
            and f"{len(HOSTILE_CSV_VALUES)} quarantined" in output.out), output.out
    with catalogue_engine.connect() as connection:
        stored = connection.execute(text("SELECT obsid FROM spectra")).scalars().all()
    assert sorted(stored) == sorted(int(row["obsid"]) for row in good)
    assert_quarantined(catalogue_engine, catalogue, expected)


def test_hostile_fits_values_cost_one_row_each(catalogue_engine, tmp_path):
    from astropy.table import Table

    good = good_catalogue_rows(4)
    hostile = [  # (column, value, reason)
        ("spid", 99999, "spid out of range [1, 16]: 99999"),
        ("designation", b"J" * 40, "designation longer than 32 characters"),
        ("lmjd", 10 ** 12, "lmjd out of range"),
        ("obsid", 1e19, "obsid out of range"),                   # would wrap in int64
        ("obsid", -5.0, "obsid out of range"),
        ("designation", b"J12\xff\xfe", "designation is not valid UTF-8"),
        ("dec", -95.0, "dec out of range"),
    ]
    rows = [dict(row) for row in good]
    for number, (column, value, _) in enumerate(hostile):
        bad = dict(good_catalogue_rows(1, first_obsid=2_000_000_000 + number)[0])
        bad[column] = value
        rows.append(bad)
    table = Table({
        "OBSID": np.array([float(r["obsid"]) for r in rows]),          # float: 1e19, -5
        "DESIGNATION": np.array([r["designation"] if isinstance(r["designation"], bytes)
                                 else r["designation"].encode() for r in rows], dtype="S40"),
        "RA": np.array([float(r["ra"]) for r in rows]),
        "DEC": np.array([float(r["dec"]) for r in rows]),
        "LMJD": np.array([int(r["lmjd"]) for r in rows], dtype=np.int64),
        "SPID": np.array([int(r["spid"]) for r in rows], dtype=np.int64),
        "FIBERID": np.array([int(r["fiberid"]) for r in rows], dtype=np.int64),
    })
    path = tmp_path / "hostile.fits.gz"
    table.write(path)
    summary = ingest_spectra(catalogue_engine, SpectraIngestOptions(catalogue=str(path),
                                                                    metadata_only=True))
    assert (summary.loaded, summary.quarantined) == (len(good), len(hostile))
    assert summary.exit_code == 0
    assert_quarantined(catalogue_engine, path,
                       {len(good) + 1 + k: reason for k, (_, _, reason) in enumerate(hostile)})


def test_undecodable_row_never_overwrites_stored_values(catalogue_engine, tmp_path):
    good = good_catalogue_rows(3)
    first = write_csv_bytes(tmp_path / "first.csv.gz", good)
    ingest_spectra(catalogue_engine, SpectraIngestOptions(catalogue=str(first),
                                                          metadata_only=True))
    before = table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid])
    # The same obsid again, in Latin-1 and with a changed position: refused as a whole.
    changed = dict(good[1], designation=b"J12\xe900.00+300000.0", ra="181.5")
    second = write_csv_bytes(tmp_path / "second.csv.gz", [good[0], changed, good[2]])
    summary = ingest_spectra(catalogue_engine, SpectraIngestOptions(catalogue=str(second),
                                                                    metadata_only=True))
    assert (summary.updated, summary.unchanged, summary.quarantined) == (0, 2, 1)
    assert table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]) == before
    assert_quarantined(catalogue_engine, second, {2: "designation is not valid UTF-8"})


def test_oversize_csv_field_costs_only_its_row(catalogue_engine, tmp_path, capsys):
    rows = good_catalogue_rows(3)
    rows[1] = dict(rows[1], subclass="y" * 300_000)
    catalogue = write_csv_bytes(tmp_path / "oversize.csv.gz", rows)
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(catalogue),
                   "--metadata-only") == 0
    assert "Traceback" not in capsys.readouterr().err
    with catalogue_engine.connect() as connection:
        stored = connection.execute(text("SELECT obsid FROM spectra")).scalars().all()
    assert sorted(stored) == [int(rows[0]["obsid"]), int(rows[2]["obsid"])]
    assert_quarantined(catalogue_engine, catalogue,
                       {2: "unreadable CSV row (line 3): field larger than field limit"})


def test_a_stray_quote_costs_only_its_line(catalogue_engine, tmp_path, capsys):
    """The csv module reads every line after an unclosed quote into that one field: the
    rest of the file was neither stored nor quarantined (2 of 1,000 rows, exit 0)."""
    rows = good_catalogue_rows(40)
    rows[1] = dict(rows[1], subclass='"G2 see comment')         # opens a quote, never closes it
    rows[-1] = dict(rows[-1], subclass='"K0')                   # and on the last line
    rows[5] = dict(rows[5], subclass='"G2"V')                   # text after a closing quote
    catalogue = write_csv_bytes(tmp_path / "stray-quote.csv.gz", rows)
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(catalogue),
                   "--metadata-only") == 0
    assert "37 loaded" in capsys.readouterr().out
    with catalogue_engine.connect() as connection:
        stored = connection.execute(text("SELECT obsid FROM spectra")).scalars().all()
    assert sorted(stored) == sorted(int(r["obsid"]) for k, r in enumerate(rows)
                                    if k not in (1, 5, 39))
    assert_quarantined(catalogue_engine, catalogue, {
        2: "unreadable CSV row (line 3): a quoted field is not closed on its line",
        6: "unreadable CSV row (line 7): ',' expected after '\"'",
        40: "unreadable CSV row (line 41): a quoted field is not closed on its line"})


def test_a_stray_quote_in_the_header_names_the_file(tmp_path):
    from etl.catalogue import read_table

    path = tmp_path / "labels.csv"
    path.write_text('APOGEE_ID,"TEFF\n2M1,5000\n')
    with pytest.raises(ValueError, match="labels.csv: unreadable CSV header: a quoted field "
                                         "is not closed on its line"):
        read_table(path)


def test_hostile_label_values_cost_one_row_each(catalogue_engine, tmp_path, capsys):
    header = b"APOGEE_ID,RA,DEC,TEFF,LOGG,FE_H,GOOD_FLAG"
    good = [b"2M0001,10.0,20.0,5000,4.5,-0.2,1", b"2M0002,11.0,21.0,4800,4.4,0.1,1",
            b"2M0003,12.0,22.0,5100,4.3,0.0,0"]
    hostile = [
        (b"2M" + b"9" * 40 + b",13.0,23.0,5000,4.5,0.0,1", "apogee_id longer than 40"),
        (b"2M0005,400,23.0,5000,4.5,0.0,1", "ra out of range"),
        (b"2M0006,13.0,abc,5000,4.5,0.0,1", "non-numeric dec: 'abc'"),
        (b"2M0007,13.0,23.0,5000,4.5,0.0,99999", "good_flag out of range"),
        (b"2M\xff08,13.0,23.0,5000,4.5,0.0,1", "apogee_id is not valid UTF-8"),
        ("2M0009,13.0,23.0,\u0665\u0660\u0660\u0660,4.5,0.0,1".encode(),
         "non-numeric teff"),
        (b"2M0010,13.0,23.0,5000,4.5," + b"1" * 200_000 + b",1", "unreadable CSV row"),
        (b"2M0011,13.0,,5000,4.5,0.0,1", "missing dec"),
        # physical ranges: a unit mistake or a sentinel, once stored as a good label
        (b"2M0012,13.0,23.0,3.70,4.5,0.0,1", "teff out of range [1000.0, 100000.0]: '3.70'"),
        (b"2M0013,13.0,23.0,5000,25000,0.0,1", "logg out of range [-2.0, 10.0]: '25000'"),
        (b"2M0014,13.0,23.0,5000,4.5,-999,1", "feh out of range [-6.0, 2.0]: '-999'"),
        (b"2M0015,13.0,23.0,5000,4.5,99,1", "feh out of range"),
    ]
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\n".join([header] + good + [line for line, _ in hostile]) + b"\n")
    assert run_cli(url_of(catalogue_engine), "ingest", "labels", str(path)) == 0
    output = capsys.readouterr()
    assert "Traceback" not in output.err
    assert f"{len(good)} loaded" in output.out
    assert f"{len(hostile)} quarantined" in output.out
    with catalogue_engine.connect() as connection:
        stored = connection.execute(text(
            "SELECT apogee_id FROM reference_labels ORDER BY apogee_id")).scalars().all()
    assert stored == ["2M0001", "2M0002", "2M0003"]
    assert_quarantined(catalogue_engine, path, {len(good) + 1 + k: reason
                                                for k, (_, reason) in enumerate(hostile)})


def test_the_file_flow_leaves_out_the_labels_the_database_refuses(tmp_path):
    """train-files read a Teff of 3.7 (log10 K) or a log g of 25000 as a good label."""
    from etl.filesets import read_labels

    path = tmp_path / "labels.csv"
    path.write_text("APOGEE_ID,RA,DEC,TEFF,LOGG,FE_H,GOOD_FLAG\n"
                    "2M1,10,1,5000,4.4,0.1,1\n2M2,11,2,3.70,4.4,0,1\n2M3,12,3,5000,25000,0,1\n"
                    "2M4,13,4,5000,4.4,-9999,1\n2M5,14,5,5000,4.4,abc,1\n")
    with pytest.warns(UserWarning, match=r"labels.csv: 3 row\(s\) with a label that cannot be "
                                         r"used are left out \(row 2: teff out of range"):
        table = read_labels(str(path))
    assert list(table["good"]) == [True, False, False, False, False]
    assert np.isnan(table["teff"][1]) and np.isnan(table["logg"][2]) and np.isnan(table["feh"][3])


def test_hostile_payne_values_cost_one_row_each(catalogue_engine, simulated_set, tmp_path):
    from astropy.table import Table

    source = Table.read(simulated_set / "apogee_payne.fits")
    ids = np.array(source["APOGEE_ID"], dtype="S60")
    ids[0] = b"2M" + b"7" * 45                              # longer than apogee_id's 40
    ids[1] = b"2M\xe9\xe9"                                  # Latin-1, not UTF-8
    flags = np.array(source["good_flag"], dtype=np.int32)
    flags[2] = 99999                                        # beyond SMALLINT
    ra = np.array(source["RA"], dtype=float)
    ra[3] = 400.0
    table = Table({"APOGEE_ID": ids, "RA": ra, "DEC": source["DEC"],
                   "payne": source["payne"], "good_flag": flags})
    path = tmp_path / "payne_hostile.fits"
    table.write(path)
    summary = ingest_labels(catalogue_engine, LabelsIngestOptions(path=str(path)))
    assert (summary.loaded, summary.quarantined) == (len(table) - 4, 4)
    assert_quarantined(catalogue_engine, path, {
        1: "apogee_id longer than 40", 2: "apogee_id is not valid UTF-8",
        3: "good_flag out of range", 4: "ra out of range"})


def test_database_refusal_costs_only_the_refused_rows(catalogue_engine, tmp_path, capsys):
    """A constraint the checks cannot know (added to the database here): the batch is
    written in parts and only the refused rows are quarantined, with the database's
    message."""
    rows = good_catalogue_rows(9)
    refused = {3, 8}                                          # fibres 102 and 107
    with catalogue_engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(
                "ALTER TABLE spectra ADD CONSTRAINT test_refused_fibres "
                "CHECK (fiberid NOT IN (102, 107))")
        else:
            connection.exec_driver_sql(
                "CREATE TRIGGER test_refused_fibres BEFORE INSERT ON spectra "
                "WHEN NEW.fiberid IN (102, 107) BEGIN SELECT RAISE(ABORT, "
                "'fibre refused by test_refused_fibres'); END")
    try:
        catalogue = write_csv_bytes(tmp_path / "refused.csv.gz", rows)
        code = run_cli(url_of(catalogue_engine), "ingest", "spectra", str(catalogue),
                       "--metadata-only", "--batch-rows", "4")
        output = capsys.readouterr()
    finally:
        with catalogue_engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(
                    "ALTER TABLE spectra DROP CONSTRAINT test_refused_fibres")
            else:
                connection.exec_driver_sql("DROP TRIGGER test_refused_fibres")
    assert code == 0
    assert "Traceback" not in output.err
    assert "the database refused the batch" in output.err
    assert "7 loaded" in output.out and "2 quarantined" in output.out
    with catalogue_engine.connect() as connection:
        stored = connection.execute(text("SELECT obsid FROM spectra")).scalars().all()
    assert sorted(stored) == [int(row["obsid"]) for number, row in enumerate(rows, 1)
                              if number not in refused]
    assert_quarantined(catalogue_engine, catalogue,
                       {number: "refused by the database: " for number in refused})
    assert all("test_refused_fibres" in row.reason for row in quarantine_rows(catalogue_engine))


# --------------------------------------------------------------------------------------
# File paths never leave the spectra root.
class OpenWatch:
    """Records every file opened in a folder (Linux inotify IN_OPEN): proof that a path is
    never opened, which the result of an ingest alone cannot show."""
    IN_OPEN = 0x20

    def __init__(self, folder):
        import ctypes
        import os

        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK)
        if self._fd < 0 or self._libc.inotify_add_watch(
                self._fd, os.fsencode(str(folder)), self.IN_OPEN) < 0:
            pytest.skip("inotify unavailable")

    def opened(self):
        import os
        import struct

        names = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return names
            position = 0
            while position < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, position)
                name = data[position + 16: position + 16 + length].rstrip(b"\0")
                if name:
                    names.append(name.decode())
                position += 16 + length

    def close(self):
        import os

        os.close(self._fd)


@pytest.fixture
def escaping_paths(simulated_set, tmp_path):
    """A spectra root and, next to it, real spectrum files that catalogue rows reach
    through '..', an absolute path and a symlink inside the root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(simulated_set / "spectra", root / "spectra")
    outside.mkdir()
    with open(simulated_set / "lamost_catalog.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    victims = rows[-3:]
    for victim in victims:                 # the only copy of these files is outside
        target = root / victim["filename"]
        shutil.move(target, outside / target.name)
    dotdot = dict(victims[0], filename="../outside/" + victims[0]["filename"].split("/")[-1])
    absolute = dict(victims[1], filename=str(outside / victims[1]["filename"].split("/")[-1]))
    link = root / victims[2]["filename"]
    link.symlink_to(outside / link.name)
    catalogue = tmp_path / "escaping.csv"
    with open(catalogue, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(rows[:-3] + [dotdot, absolute, victims[2]])
    return root, outside, catalogue, len(rows) - 3


def test_paths_leaving_the_root_are_quarantined_and_never_opened(catalogue_engine,
                                                                 escaping_paths):
    root, outside, catalogue, n_good = escaping_paths
    url = url_of(catalogue_engine)
    watch = OpenWatch(outside)
    try:
        assert run_cli(url, "ingest", "spectra", str(catalogue), "--spectra-root", str(root),
                       "--unreferenced", "ignore") == 0
        assert_quarantined(catalogue_engine, catalogue, {
            n_good + 1: "file path leads outside the spectra root: '../outside/",
            n_good + 2: "absolute file path refused",
            n_good + 3: "file path leads outside the spectra root: 'spectra/"})
        # Without a catalogue, the symlink found under the root is quarantined as a file.
        assert run_cli(url, "ingest", "spectra", "--spectra-root", str(root)) == 0
        assert watch.opened() == []
    finally:
        watch.close()
    link = [row for row in quarantine_rows(catalogue_engine) if row.source_row == 0]
    assert len(link) == 1 and link[0].source_file.startswith(str(root))
    assert "leads outside the spectra root" in link[0].reason
    with catalogue_engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM spectra")).scalar()
    assert count == n_good


def test_workers_never_open_stored_paths_that_leave_the_root(catalogue_engine, escaping_paths):
    """Inference resolves stored file paths with the same check as ingest."""
    from etl.inference import spectra_for
    from etl.spectrum_files import UnsafePathError

    root, outside, catalogue, n_good = escaping_paths
    ingest_spectra(catalogue_engine, SpectraIngestOptions(
        catalogue=str(catalogue), spectra_root=str(root), unreferenced="ignore"))
    with catalogue_engine.begin() as connection:
        obsids = connection.execute(text(
            "SELECT obsid FROM spectra ORDER BY obsid LIMIT 4")).scalars().all()
        hostile = {obsids[0]: "../outside/" + next(outside.iterdir()).name,
                   obsids[1]: str(next(outside.iterdir())),
                   obsids[2]: "spectra/../../outside/" + next(outside.iterdir()).name}
        for obsid, path in hostile.items():     # what a tampered database would hold
            connection.execute(schema.spectra.update().where(
                schema.spectra.c.obsid == obsid).values(file_path=path))
    refused = {}
    with catalogue_engine.connect() as connection:
        rows = {row[0]: row[1] for row in spectra_for(connection, obsids, str(root),
                                                      refused=refused)}
        with pytest.raises(UnsafePathError):
            spectra_for(connection, obsids[:1], str(root))
    assert all(rows[obsid] is None for obsid in hostile)
    assert sorted(refused) == sorted(hostile)
    assert "absolute file path refused" in refused[obsids[1]]
    assert "leads outside the spectra root" in refused[obsids[0]]
    assert rows[obsids[3]].startswith(str(root.resolve()))


def test_header_values_are_checked_too(catalogue_engine, simulated_set, tmp_path):
    """A spectrum file whose header holds an out-of-range value is quarantined, not the
    batch of files it is in."""
    root = tmp_path / "root"
    shutil.copytree(simulated_set / "spectra", root / "spectra")
    files = sorted((root / "spectra").rglob("spec-*.fits.gz"))
    with fits.open(files[0]) as hdus:
        hdus[0].header["SPID"] = 99999
        hdus.writeto(tmp_path / "edited.fits")
    files[0].write_bytes(gzip.compress((tmp_path / "edited.fits").read_bytes()))
    summary = ingest_spectra(catalogue_engine, SpectraIngestOptions(spectra_root=str(root)))
    assert (summary.loaded, summary.quarantined) == (len(files) - 1, 1)
    (rejected,) = quarantine_rows(catalogue_engine)
    assert rejected.source_file == str(files[0]) and rejected.source_row == 0
    assert "spid out of range [1, 16]: 99999" in rejected.reason
