"""The Celery worker of ``/tap/async`` jobs: ``celery -A service.tap_worker worker -Q tap``.

It reads the same settings as the API (LAMOST_VAC_BROKER_URL, the reader URL,
LAMOST_VAC_TAP_JOB_DIR on a folder the API shares, LAMOST_VAC_TAP_ASYNC_TIMEOUT_MS) and
runs each job as the API's ``/tap/sync`` would, in a request context of a service app
built from those settings (at the URL the job was created at): the same checks, the same
read-only engine, the async statement timeout.
"""
from functools import lru_cache

from etl.settings import load_settings
from service import tap_jobs
from service.app import create_app
from service.blueprints.tap import run_async_job
from service.state import state

celery = tap_jobs.celery_app(load_settings().broker_url or "memory://localhost/")


@lru_cache(maxsize=1)
def service_app():
    return create_app(load_settings())


@celery.task(name=tap_jobs.TASK_NAME)
def run_job(job_id):
    app = service_app()
    job = tap_jobs.JobStore(state(app).settings.tap_job_dir).load(job_id)
    # As a request to the URL the job was created at: the links in its result (the
    # DataLink service descriptor) lead back to the service, not to this worker.
    with app.test_request_context(base_url=job.base_url if job else None):
        run_async_job(job_id)
