"""``lamost-vac serve``: run the read-only query service (development server).

Production: ``gunicorn -c python:service.gunicorn_conf -b 127.0.0.1:8000
'service.app:create_app()'`` (workers, timeouts and request limits in
:mod:`service.gunicorn_conf`); both read the same environment
(LAMOST_VAC_READER_DATABASE_URL, LAMOST_VAC_STATEMENT_TIMEOUT_MS and the
limits, see the README's configuration table).
"""


from etl.commands import port_number


def register(subparsers):
    parser = subparsers.add_parser(
        "serve", help="run the read-only query service (cone search, REST API)",
        description="Serve /scs (IVOA cone search), /api/v1/..., VOSI and /openapi.json "
        "from the catalogue at LAMOST_VAC_READER_DATABASE_URL (default: the writer URL, "
        "opened read-only). For production use gunicorn: "
        "gunicorn -c python:service.gunicorn_conf -b 127.0.0.1:8000 "
        "'service.app:create_app()'.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=port_number, default=8000, help="port to listen on")
    parser.add_argument("--url", default=None,
                        help="catalogue database to read (default: "
                        "LAMOST_VAC_READER_DATABASE_URL, else LAMOST_VAC_DATABASE_URL)")
    parser.add_argument("--debug", action="store_true", help="Flask debug mode (reloader)")
    parser.set_defaults(func=run_serve)


def run_serve(args):
    import dataclasses

    from etl.settings import load_settings
    from service.app import create_app

    settings = load_settings()
    if args.url:
        settings = dataclasses.replace(settings, reader_database_url=args.url)
    app = create_app(settings)
    app.run(host=args.host, port=args.port, debug=args.debug, threaded=True)
    return 0
