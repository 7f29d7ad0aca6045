"""``/tap/async`` jobs (UWS 1.1): where they are kept and how they run.

* :class:`JobStore`: one folder per job under LAMOST_VAC_TAP_JOB_DIR (``job.json``, the
  result, the error document), written atomically; the API and the workers that run
  the jobs share it. The service stays read-only on the database: jobs are not stored
  there. A job is destroyed (folder removed) once its destruction time has passed.
* Running a job: :func:`run_job` runs the job's query exactly as ``/tap/sync`` would
  (same checks, same formats) with the async statement timeout, and stores the answer.
  With a Celery broker (LAMOST_VAC_BROKER_URL) the API sends the task
  ``service.tap_jobs.run_job`` to the ``tap`` queue, served by
  ``celery -A service.tap_worker worker -Q tap`` (:mod:`service.tap_worker`); without one (the embedded default) the
  job runs in the API process when it is started ("eager", as the pipeline's tasks).
"""
import datetime as dt
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional
from xml.etree import ElementTree

PENDING, QUEUED, EXECUTING = "PENDING", "QUEUED", "EXECUTING"
COMPLETED, ERROR, ABORTED = "COMPLETED", "ERROR", "ABORTED"
ACTIVE_PHASES = (QUEUED, EXECUTING)
QUEUE = "tap"
TASK_NAME = "service.tap_jobs.run_job"
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def iso(value: Optional[dt.datetime]) -> Optional[str]:
    """``YYYY-MM-DDThh:mm:ssZ`` in UTC, the year always four digits (strftime's ``%Y``
    does not pad years before 1000, which :func:`parse_iso` could not read back)."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc)
    return f"{value.year:04d}-{value:%m-%dT%H:%M:%S}Z"


def parse_iso(text: str) -> dt.datetime:
    """An ISO 8601 time as an aware UTC datetime; ValueError when it is not one (or is
    outside what a datetime holds once in UTC)."""
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)
    except OverflowError:
        raise ValueError(f"{text[:40]!r} is out of range") from None


@dataclass
class Job:
    job_id: str
    phase: str
    creation_time: str
    execution_duration: int                 # seconds
    destruction: str
    parameters: dict = field(default_factory=dict)
    start_time: Optional[str] = None
    end_time: Optional[str] = None
    error: Optional[str] = None
    result_mime: Optional[str] = None
    uploads: dict = field(default_factory=dict)     # multipart part name -> document
    client: Optional[str] = None                    # address that created it (limits)
    base_url: Optional[str] = None      # the service URL it was created at (its links)


class JobStore:
    def __init__(self, directory):
        self.directory = Path(directory)

    def _folder(self, job_id) -> Optional[Path]:
        if not _JOB_ID.fullmatch(job_id or ""):
            return None                 # never a path from the request
        return self.directory / job_id

    def create(self, parameters, execution_duration, retention_s, client=None,
               base_url=None) -> Job:
        now = utc_now()
        job = Job(uuid.uuid4().hex, PENDING, iso(now), execution_duration,
                  iso(now + dt.timedelta(seconds=retention_s)), dict(parameters),
                  client=client, base_url=base_url)
        self._folder(job.job_id).mkdir(parents=True)
        self.save(job)
        return job

    def save(self, job: Job):
        folder = self._folder(job.job_id)
        self._write(folder / "job.json", json.dumps(asdict(job)).encode())

    @staticmethod
    def _write(path: Path, data: bytes):
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)

    def load(self, job_id) -> Optional[Job]:
        folder = self._folder(job_id)
        if folder is None:
            return None
        # A job whose stored state cannot be read (times included) is no job: it must
        # not break the list of the others.
        try:
            job = Job(**json.loads((folder / "job.json").read_text()))
            parse_iso(job.creation_time)
            destruction = parse_iso(job.destruction)
        except (TypeError, OSError, ValueError, AttributeError):
            return None
        if destruction <= utc_now():
            self.delete(job_id)
            return None
        return job

    def delete(self, job_id):
        folder = self._folder(job_id)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def jobs(self) -> list:
        if not self.directory.is_dir():
            return []
        found = [self.load(p.name) for p in self.directory.iterdir() if p.is_dir()]
        return sorted((j for j in found if j is not None), key=lambda j: j.creation_time)

    def write_document(self, job_id, name, data: bytes):
        self._write(self._folder(job_id) / name, data)

    def store_uploads(self, job: Job, parts: dict):
        """Keep the uploaded parts ({part name: bytes}) for the run; document names are
        ours, never the client's."""
        for index, (part, data) in enumerate(parts.items()):
            document = f"upload-{index}"
            self.write_document(job.job_id, document, data)
            job.uploads[part] = document
        self.save(job)

    def upload_files(self, job: Job) -> dict:
        """{part name: file} of the job's uploads, as a request's files."""
        import io

        return {part: io.BytesIO(self.read_document(job.job_id, document) or b"")
                for part, document in job.uploads.items()}

    def read_document(self, job_id, name) -> Optional[bytes]:
        try:
            return (self._folder(job_id) / name).read_bytes()
        except OSError:
            return None


def upload_part_names(upload: Optional[str]) -> list:
    """The multipart parts an UPLOAD parameter names (``name,param:part;...``), in
    order, each once: the only parts of a request a job keeps."""
    names = []
    for item in (upload or "").split(";"):
        source = item.partition(",")[2].strip()
        if source.startswith("param:") and source[len("param:"):] not in names:
            names.append(source[len("param:"):])
    return names


def error_message_of(votable: bytes) -> str:
    """The QUERY_STATUS=ERROR message of a service error document."""
    try:
        root = ElementTree.fromstring(votable)
    except ElementTree.ParseError:
        return "the query failed"
    for info in root.iter("{http://www.ivoa.net/xml/VOTable/v1.3}INFO"):
        if info.get("name") == "QUERY_STATUS" and info.get("value") == "ERROR":
            return (info.text or "").strip() or "the query failed"
    return "the query failed"


def run_job(store: JobStore, job_id: str, execute) -> None:
    """Run a QUEUED job: ``execute(job)`` is the /tap/sync answer to its parameters (a
    Flask response). A job aborted or deleted meanwhile keeps that state."""
    job = store.load(job_id)
    if job is None or job.phase != QUEUED:
        return
    job.phase, job.start_time = EXECUTING, iso(utc_now())
    store.save(job)
    response = execute(job)
    body = response.get_data()
    current = store.load(job_id)
    if current is None or current.phase != EXECUTING:
        return
    if response.status_code == 200:
        store.write_document(job_id, "result", body)
        current.phase, current.result_mime = COMPLETED, response.content_type
    else:
        store.write_document(job_id, "error", body)
        current.phase, current.error = ERROR, error_message_of(body)
    current.start_time = job.start_time
    current.end_time = iso(utc_now())
    store.save(current)


# ---------------------------------------------------------------------------------------
# Celery: the API sends the task by name; the worker defines it (service/tap_worker.py).
@lru_cache(maxsize=4)
def celery_app(broker_url: str):
    from celery import Celery

    app = Celery("lamost_vac_tap")
    app.conf.update(broker_url=broker_url, task_default_queue=QUEUE,
                    task_serializer="json", accept_content=["json"], task_acks_late=True,
                    worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
                    task_ignore_result=True)
    return app


def dispatch(settings, job_id, run_here):
    """Queue ``job_id`` for a worker, or with no broker run it now (``run_here``)."""
    if settings.eager_tasks:
        run_here(job_id)
    else:
        celery_app(settings.broker_url).send_task(TASK_NAME, args=[job_id], queue=QUEUE)
