"""gunicorn configuration of the query service (used by the Dockerfile and
docker-compose.yml)::

    gunicorn -c python:service.gunicorn_conf -b 127.0.0.1:8000 'service.app:create_app()'

gunicorn's command-line flags (or ``GUNICORN_CMD_ARGS``) override any value set here.

* ``workers`` x ``threads``: one ``gthread`` process per core (rendering VOTable or FITS is
  Python work under the GIL: processes use the cores) with 8 threads each (a request
  spends much of its time waiting for the database). The service runs at most
  LAMOST_VAC_LARGE_QUERIES_MAX large queries at a time (cores / 2) and answers the others
  429 at once, so threads are always free for small queries, /health and /availability.
  Measured with ``python bench/attack.py`` on 2 shared cores: 2 x 8 threads answered
  ~300 small queries/s and kept them with 8 attackers; 3 x 4 threads ~240/s; 5 sync
  workers ~190/s.
* ``timeout``: a worker whose main loop stops answering for this long is restarted
  (queries themselves are bounded by the statement timeout).
* ``limit_request_line`` / ``limit_request_fields`` / ``limit_request_field_size``: above
  what the app accepts (:data:`service.errors.MAX_REQUEST_TARGET_BYTES` and the header
  limits), so that a client sending an over-long URI or header gets the service's own
  414 / 431 (JSON, or a VOTable on /scs). Only beyond these values, gunicorn's maxima,
  does gunicorn answer by itself, with an HTML page.

A slow client holds a thread while it sends its request or reads a large answer; in
front of the public internet put a buffering reverse proxy (e.g. nginx, which can also
rate-limit request floods) and set LAMOST_VAC_TRUSTED_PROXIES so that clients are still
told apart by their own address.
"""
from etl.settings import available_cores, load_settings
from service.errors import MAX_HEADER_FIELD_BYTES, MAX_HEADER_FIELDS

_statement_timeout_s = load_settings().statement_timeout_ms / 1000

bind = "127.0.0.1:8000"
worker_class = "gthread"
workers = available_cores()
threads = 8
timeout = int(max(30, _statement_timeout_s + 30))
graceful_timeout = timeout

# gunicorn's largest bounded request line (0 would read a line of any length): room for
# twice the URI the app accepts.
limit_request_line = 8190
limit_request_fields = 2 * MAX_HEADER_FIELDS
limit_request_field_size = 2 * MAX_HEADER_FIELD_BYTES
