"""Settings: declared once (etl/settings.py), read by type, documented by the README table."""
import re
from pathlib import Path

import pytest

from etl.settings import Settings, load_settings, markdown_table

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("etl", "models", "service")


def test_readme_configuration_table_is_the_declared_one():
    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme


def test_every_variable_the_code_reads_is_a_declared_setting():
    declared = {f.metadata["variable"] for f in Settings.__dataclass_fields__.values()}
    declared |= {name + "_FILE" for name in declared}
    read = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            read |= set(re.findall(r"\b(LAMOST_VAC_[A-Z0-9_]+)", path.read_text()))
    assert read <= declared, read - declared


def test_each_type_is_read_by_its_reader_and_errors_name_the_variable():
    s = load_settings({"LAMOST_VAC_INGEST_BATCH_ROWS": "123", "LAMOST_VAC_SMALL_CONE_DEG": "0.5",
                       "LAMOST_VAC_DEBUG": "true", "LAMOST_VAC_MODEL_DIR": "/m",
                       "LAMOST_VAC_BROKER_URL": ""})
    assert (s.ingest_batch_rows, s.small_cone_deg, s.debug, s.model_dir, s.broker_url) == \
        (123, 0.5, True, "/m", None)
    assert load_settings({}) == Settings()
    for name, raw in [("LAMOST_VAC_INGEST_BATCH_ROWS", "1.5"), ("LAMOST_VAC_DEBUG", "maybe"),
                      ("LAMOST_VAC_VISIBILITY_TIMEOUT_S", "-3"),
                      ("LAMOST_VAC_SMALL_CONE_DEG", "inf")]:
        with pytest.raises(ValueError, match=name):
            load_settings({name: raw})


def test_the_celery_app_takes_its_timeouts_from_the_settings():
    from celery import Celery

    from etl import tasks

    app = tasks.configure(Celery("probe"), load_settings({
        "LAMOST_VAC_BROKER_URL": "redis://127.0.0.1:6379/15",
        "LAMOST_VAC_VISIBILITY_TIMEOUT_S": "77", "LAMOST_VAC_REPROCESS_INTERVAL_S": "99"}))
    assert app.conf.broker_transport_options["visibility_timeout"] == 77
    assert app.conf.beat_schedule["reprocess-stale"]["schedule"] == 99.0
