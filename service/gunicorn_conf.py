"""gunicorn configuration of the query service (used by the Dockerfile and
docker-compose.yml)::

    gunicorn -c python:service.gunicorn_conf -b 127.0.0.1:8000 'service.app:create_app()'

gunicorn's command-line flags (or ``GUNICORN_CMD_ARGS``) override any value set here.

* ``workers``: 2 x cores + 1 processes, ``sync`` (one request at a time each). Rendering a
  VOTable or FITS answer is Python work under the GIL, so processes, not threads, use the
  cores. The service runs at most LAMOST_VAC_LARGE_QUERIES_MAX large queries at a time
  (cores / 2) and answers the others 429 at once, so most workers are always free for
  small queries, /health and /availability (measured with ``python bench/attack.py``).
* ``timeout``: a worker is restarted when a request runs longer than the statement
  timeout plus time to render and send the largest accepted answer.
* ``limit_request_line`` / ``limit_request_fields`` / ``limit_request_field_size``: above
  what the app accepts (:data:`service.app.MAX_REQUEST_TARGET_BYTES` and the header
  limits), so that a client sending an over-long URI or header gets the service's own 414 /
  431 (JSON, or a VOTable on /scs). Only beyond these values, gunicorn's maxima, does
  gunicorn answer by itself, with an HTML page.

A slow client holds a sync worker while it sends its request or reads a large answer;
in front of the public internet put a buffering reverse proxy (e.g. nginx) and set
LAMOST_VAC_TRUSTED_PROXIES so that clients are still told apart by their own address.
"""
from etl.settings import load_settings
from service.app import (MAX_HEADER_FIELD_BYTES, MAX_HEADER_FIELDS,
                         MAX_REQUEST_TARGET_BYTES, available_cores)

_statement_timeout_s = load_settings().statement_timeout_ms / 1000

bind = "127.0.0.1:8000"
worker_class = "sync"
workers = 2 * available_cores() + 1
timeout = int(max(30, _statement_timeout_s + 30))
graceful_timeout = timeout

# gunicorn's largest bounded request line (0 would read a line of any length), twice
# MAX_REQUEST_TARGET_BYTES.
limit_request_line = max(8190, 2 * MAX_REQUEST_TARGET_BYTES)
limit_request_fields = 2 * MAX_HEADER_FIELDS
limit_request_field_size = 2 * MAX_HEADER_FIELD_BYTES
