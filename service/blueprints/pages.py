"""Pages for people: the catalogue browser.

``/`` (for a browser; JSON clients keep getting the service description, see
:mod:`service.blueprints.vosi`) is a search form whose results are one page of
``/api/v1/estimates``: the form is translated into that endpoint's parameters (a cone in
degrees or sexagesimal, parsed with astropy, the radius with its unit), validated by the
same :class:`service.openapi.Param` objects and run by the same
:func:`service.blueprints.estimates.query_page`, so the table, the download links and the
``/api/v1`` URL shown always return the same rows. Its plots (also ``/plots/kiel.png``
and ``/plots/histograms.png``) are drawn from the histograms the database counts on every
row of the selection (``/api/v1/estimates/histograms``,
:func:`service.blueprints.estimates.query_histograms`).

``/spectra/<obsid>`` shows what ``/api/v1/spectra/<obsid>`` answers (the same function)
with the spectrum drawn from its file (``/spectra/<obsid>/spectrum.png``): the file is
opened only when its stored path resolves inside the spectra root
(:func:`etl.spectrum_files.resolve_under_root`), the model artifact only from under the
model directory and when its SHA-256 matches the registry
(:func:`models.artifact.load_model`). ``/models`` and ``/about`` describe the models and
the method.

Bad form input gives the form back (HTTP 400) with the message next to the field; every
other error of these pages is an HTML page (see :func:`service.errors.error_response`).
"""
import base64
import io
import json
import os
import re
import threading

import numpy as np
from flask import Blueprint, Response, g, render_template, request, send_file, url_for
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from werkzeug.datastructures import MultiDict
from urllib.parse import urlencode

from etl import schema
from models.flags import FEH_MIN, FLAG_DESCRIPTIONS, SNR_RANGE, TEFF_RANGE, describe_flags
from service import plots
from service.blueprints import estimates as estimates_api
from service.blueprints import spectra as spectra_api
from service.blueprints.models import model_rows
from service.catalogue import CATALOGUE, HISTOGRAM_BINS
from service.db import is_statement_timeout
from service.errors import error_response
from service.openapi import ParamError, parse
from service.state import is_small_cone, large_query, state

blueprint = Blueprint("pages", __name__)

PAGE_SIZES = (20, 50, 100, 500)
DEFAULT_PAGE_SIZE = 50
RANGE_FIELDS = [("teff", "Teff", "K"), ("logg", "log g", "dex"), ("feh", "[Fe/H]", "dex"),
                ("snrg", "SNR g", None)]
# What the form sends besides the range bounds; "exclude" is one checkbox per flag bit.
FORM_FIELDS = (["ra", "dec", "radius", "flags", "exclude", "model_version", "limit", "cursor"]
               + [f"{name}_{end}" for name, _, _ in RANGE_FIELDS for end in ("min", "max")])
# API parameter -> the form field its message is shown next to.
FIELD_OF_PARAMETER = {"exclude_flags": "exclude", "columns": "search", "order": "search",
                      "format": "search"}
LABEL_NAMES = {"teff": "Teff", "logg": "log g", "feh": "[Fe/H]"}


def _render(template, status=200, **context):
    return Response(render_template(template, **context), status=status,
                    mimetype="text/html")


@blueprint.app_template_filter("significant")
def significant(value, digits=3) -> str:
    """``value`` to ``digits`` significant figures, without an exponent for the sizes the
    catalogue holds (an uncertainty of 170 K reads 170, not 1.7e+02)."""
    return f"{float(f'{value:.{digits}g}'):.12g}"


@blueprint.before_request
def _html_errors():
    g.html_errors = True


# ---------------------------------------------------------------------------------------
# The search form
class FormErrors(Exception):
    def __init__(self, errors: dict):
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))


def _as_number_text(value: float) -> str:
    return repr(float(value))


def parse_ra(text: str) -> float:
    """Right ascension in degrees from decimal degrees ('150.25'), sexagesimal hours
    ('10:01:00', '10 01 00', '10h01m00s') or an angle with its unit ('150d15m')."""
    from astropy.coordinates import Angle
    import astropy.units as u

    try:
        return float(text)
    except ValueError:
        pass
    unit = None if any(c in text.lower() for c in "hdms°'\"") else u.hourangle
    return Angle(text, unit=unit).degree


def parse_dec(text: str) -> float:
    """Declination in degrees: decimal ('-5.5') or sexagesimal ('-05:30:00', '-5d30m')."""
    from astropy.coordinates import Angle
    import astropy.units as u

    return Angle(text, unit=u.deg).degree


# A number and one angular unit: astropy's general unit parser would also take
# '1 10**99999999 deg' and spend minutes computing the power.
_RADIUS = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?)\s*"
                     r"(deg|degrees?|arcmin|arcsec|mas|d|'|\"|°)?\s*")
_RADIUS_UNITS = {None: 1.0, "deg": 1.0, "degree": 1.0, "degrees": 1.0, "d": 1.0, "°": 1.0,
                 "arcmin": 1 / 60, "'": 1 / 60, "arcsec": 1 / 3600, '"': 1 / 3600,
                 "mas": 1 / 3.6e6}


def parse_radius(text: str) -> float:
    """Cone radius in degrees from a number and an angular unit ('2 arcmin', '30 arcsec',
    '0.1 deg', '5"'); a plain number is in degrees. ValueError for anything else."""
    match = _RADIUS.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a number with an angular unit "
                         f"(deg, arcmin, arcsec, mas)")
    return float(match.group(1)) * _RADIUS_UNITS[match.group(2)]


def api_parameters(form) -> MultiDict:
    """The ``/api/v1/estimates`` parameters of the search ``form``; :class:`FormErrors`
    (field -> message) for what cannot be translated."""
    errors = {}
    api = MultiDict()
    cone = {name: form.get(name, "").strip() for name in ("ra", "dec", "radius")}
    if any(cone.values()):
        for name, parser, what in [("ra", parse_ra, "a right ascension (e.g. 150.25 or "
                                    "10:01:00 or 10h01m00s)"),
                                   ("dec", parse_dec, "a declination (e.g. -5.5 or "
                                    "-05:30:00 or -5d30m)"),
                                   ("radius", parse_radius, "an angle with its unit (e.g. "
                                    "2 arcmin, 30 arcsec, 0.1 deg)")]:
            if not cone[name]:
                errors[name] = "a cone needs RA, Dec and a radius"
                continue
            try:
                value = parser(cone[name])
            except Exception as error:  # noqa: BLE001 -- astropy raises many kinds
                errors[name] = f"{cone[name]!r} is not {what} ({type(error).__name__})"
                continue
            if not np.isfinite(value):
                errors[name] = f"{cone[name]!r} is not a finite angle"
                continue
            api[name] = _as_number_text(value)
    for name in FORM_FIELDS:
        if name in ("ra", "dec", "radius", "exclude"):
            continue
        value = form.get(name, "").strip()
        if value:
            api[name] = value
    bits = 0
    for raw in form.getlist("exclude"):
        try:
            bit = int(raw)
        except ValueError:
            bit = None
        if bit not in FLAG_DESCRIPTIONS:
            errors["exclude"] = f"{raw!r} is not a flag bit"
            break
        bits |= bit
    if bits:
        api["exclude_flags"] = str(bits)
    if errors:
        raise FormErrors(errors)
    if "limit" not in api:
        api["limit"] = str(DEFAULT_PAGE_SIZE)
    return api


def _field(error: ParamError) -> str:
    return FIELD_OF_PARAMETER.get(error.name, error.name)


def _submitted(form) -> bool:
    return "search" in form or any(form.get(name, "").strip() for name in FORM_FIELDS)


def _model_versions():
    with state().engine.connect() as connection:
        return [(m["version"], m["status"]) for m in model_rows(connection)]


def _form_context(form, errors=None, **extra):
    limits = state().limits
    return dict(form=form, errors=errors or {}, range_fields=RANGE_FIELDS,
                flag_bits=sorted(FLAG_DESCRIPTIONS.items()), page_sizes=PAGE_SIZES,
                default_page_size=DEFAULT_PAGE_SIZE, model_versions=_model_versions(),
                teff_range=TEFF_RANGE, feh_min=FEH_MIN, snr_range=SNR_RANGE,
                max_radius_deg=limits.scs_max_sr_deg, small_cone_deg=limits.small_cone_deg,
                describe=lambda name: CATALOGUE[name].description,
                **extra)


def search_page():
    """The search form and, once submitted, one page of results with the plots."""
    g.html_errors = True
    form = request.args
    if not _submitted(form):
        return _render("search.html", **_form_context(form))
    service = state()
    try:
        api = api_parameters(form)
        args = parse(estimates_api.parameters(service.limits), api)
        cone = estimates_api.check_query(args)
    except FormErrors as error:
        return _render("search.html", 400, **_form_context(form, error.errors))
    except ParamError as error:
        return _render("search.html", 400, **_form_context(form, {_field(error): error.message}))

    def respond():
        try:
            page = estimates_api.query_page(service, args)
        except ParamError as error:
            return _render("search.html", 400,
                           **_form_context(form, {_field(error): error.message}))
        # The plots are in the page (data: URIs), drawn in this request: one large query
        # per search, not three competing for the client's large-query slots.
        images, plot_problem = {}, None
        try:
            counted = estimates_api.query_histograms(service, args)
        except DBAPIError as error:
            if not is_statement_timeout(error):
                raise
            # the page of rows is there: show it, and say why the plots are not
            counted = None
            plot_problem = (f"counting every row of this selection ran past the statement "
                            f"timeout of {service.limits.statement_timeout_ms} ms; narrow "
                            "it (a cone, tighter ranges) to see them")
        else:
            images = {"kiel": _data_uri(plots.kiel_png(counted)),
                      "histograms": _data_uri(plots.histograms_png(counted))}
        return _render("search.html", **_form_context(
            form, results=_results(form, api, args, page), images=images, counted=counted,
            plot_problem=plot_problem, histogram_bins=HISTOGRAM_BINS))

    if cone is not None and is_small_cone(cone[2]):
        return respond()
    return large_query(respond)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def tap_runs_here() -> bool:
    """Whether this server answers /tap (PostgreSQL only)."""
    engine = state().tap_engine
    return engine is not None and engine.dialect.name == "postgresql"


def _results(form, api, args, page):
    base = request.host_url.rstrip("/")
    adql = estimates_api.equivalent_adql(args, page.names)
    query = urlencode(list(api.items(multi=True)))
    api_url = f"{base}/api/v1/estimates?{query}"
    kept = [(k, v) for k, v in form.items(multi=True) if k not in ("cursor", "search")]
    plot_query = urlencode([(k, v) for k, v in api.items(multi=True)
                            if k not in estimates_api.PAGE_PARAMETERS])
    next_url = (url_for("vosi.index") + "?" + urlencode(kept + [("cursor", page.next_cursor)])
                if page.next_cursor else None)
    first_url = url_for("vosi.index") + "?" + urlencode(kept) if form.get("cursor") else None
    flags_index = page.names.index("flags") if "flags" in page.names else None
    return dict(
        page=page, api_url=api_url, next_url=next_url, first_url=first_url,
        downloads=[(label, f"{api_url}&format={fmt}") for label, fmt in
                   [("VOTable", "votable"), ("CSV", "csv"), ("FITS", "fits"),
                    ("JSON", "json")]],
        kiel_url=url_for("pages.kiel_plot") + "?" + plot_query,
        histograms_url=url_for("pages.histograms_plot") + "?" + plot_query,
        histograms_api_url=f"{base}/api/v1/estimates/histograms?{plot_query}",
        adql=adql,
        tap_url=(f"{base}/tap/sync?" + urlencode({"REQUEST": "doQuery", "LANG": "ADQL",
                                                   "QUERY": adql})
                 if tap_runs_here() else None),
        obsid_index=page.names.index("obsid") if "obsid" in page.names else None,
        flags_index=flags_index,
        flag_words=lambda value: "; ".join(describe_flags(value)) or "inside the valid domain")


# ---------------------------------------------------------------------------------------
# Plots of a selection
def _plot(draw):
    service = state()
    api = MultiDict([(k, v) for k, v in request.args.items(multi=True)
                     if k not in estimates_api.PAGE_PARAMETERS])
    args = parse(estimates_api.histogram_parameters(service.limits), api)
    cone = estimates_api.check_query(args)

    def respond():
        return Response(draw(estimates_api.query_histograms(service, args)),
                        mimetype="image/png")
    if cone is not None and is_small_cone(cone[2]):
        return respond()
    return large_query(respond)


@blueprint.get("/plots/kiel.png")
def kiel_plot():
    return _plot(plots.kiel_png)


@blueprint.get("/plots/histograms.png")
def histograms_plot():
    return _plot(plots.histograms_png)


# ---------------------------------------------------------------------------------------
# Spectrum page
_ARTIFACTS = {}
_ARTIFACTS_LOCK = threading.Lock()


def current_artifact(connection):
    """(artifact, None) for the current model, or (None, why not): loaded once per
    process, only from under the model directory and with the registry's SHA-256."""
    from models.artifact import artifact_under, load_model

    models = schema.models
    row = connection.execute(
        select(models.c.version, models.c.artifact_path, models.c.artifact_sha256)
        .where(models.c.status == "current")).first()
    if row is None:
        return None, "the catalogue has no current model"
    key = (row.version, row.artifact_sha256)
    with _ARTIFACTS_LOCK:
        if key in _ARTIFACTS:
            return _ARTIFACTS[key], None
    try:
        path = artifact_under(state().settings.model_dir, row.artifact_path)
        artifact = load_model(path, expected_sha256=row.artifact_sha256)
        if artifact["version"] != row.version:
            raise ValueError(f"the file holds model {artifact['version']}")
    except Exception as error:  # noqa: BLE001 -- any failure is reported, never a 500
        # The server-side path stays private (the API does not publish it either).
        return None, (f"the artifact of the current model {row.version} cannot be loaded "
                      f"here ({type(error).__name__})")
    with _ARTIFACTS_LOCK:
        _ARTIFACTS.clear()                  # keep one: the current model
        _ARTIFACTS[key] = artifact
    return artifact, None


def _spectrum_sources(obsid):
    service = state()
    args = parse(spectra_api.parameters(service.limits), request.args,
                 path_values={"obsid": obsid})
    with service.engine.connect() as connection:
        record = spectra_api.spectrum_record(connection, args["obsid"])
        if record is None:
            return None, None, None
        path, file_problem = spectra_api.spectrum_file(connection, record["spectrum"])
    return record, path, file_problem


@blueprint.get("/spectra/<obsid>")
def spectrum_page(obsid):
    record, path, file_problem = _spectrum_sources(obsid)
    if record is None:
        return error_response(404, f"no spectrum with obsid {obsid}")
    with state().engine.connect() as connection:
        artifact, artifact_problem = current_artifact(connection)
    obsid = record["obsid"]
    return _render(
        "spectrum.html", record=record, spectrum=record["spectrum"], file_problem=file_problem,
        artifact_problem=artifact_problem, labels=LABEL_NAMES,
        selected_pixels=({label: int(e.support_.sum())
                          for label, e in artifact["model"].estimators_.items()}
                         if artifact else {}),
        plot_url=url_for("pages.spectrum_plot", obsid=obsid) if path else None,
        file_url=url_for("pages.spectrum_file", obsid=obsid) if path else None,
        json_url=url_for("spectra.get_spectrum", obsid=obsid),
        spectrum_columns=record["columns"]["spectrum"],
        flag_words=lambda value: (describe_flags(value) or ["inside the valid domain"])
        if value is not None else [])


@blueprint.get("/spectra/<obsid>/spectrum.png")
def spectrum_plot(obsid):
    from models.flags import NO_USABLE_REDSHIFT, redshift_flags
    from models.pipeline import redshift_to_use
    from models.preprocess import PreprocessConfig, SpectrumStack, continuum_normalise
    from models.readers import SpectrumReadError, read_spectrum

    record, path, file_problem = _spectrum_sources(obsid)
    if record is None:
        return error_response(404, f"no spectrum with obsid {obsid}")
    if path is None:
        return error_response(404, file_problem)
    try:
        spectrum = read_spectrum(path)
    except SpectrumReadError as error:
        return error_response(422, f"the file of spectrum {record['obsid']} cannot be read "
                                   f"({error.reason})")
    with state().engine.connect() as connection:
        artifact, _ = current_artifact(connection)
    config = artifact["preprocess"] if artifact else PreprocessConfig()
    # the rest frame of the estimate: the same redshift rule as the pipeline (a missing z
    # is not 0); without a usable one there is no rest-frame spectrum to show
    catalogue_z = record["spectrum"].get("z")
    z = redshift_to_use([np.nan if catalogue_z is None else catalogue_z],
                        [np.nan if spectrum.meta.get("z") is None else spectrum.meta["z"]])
    normalised = continuum = None
    if not redshift_flags(z)[0] & NO_USABLE_REDSHIFT:
        features, _, fitted = continuum_normalise(SpectrumStack.from_spectra([spectrum]), z, config,
                                                  return_continuum=True)
        normalised, continuum = features[0], fitted[0]
    selected = {}
    if artifact:
        for label, estimator in artifact["model"].estimators_.items():
            mask = np.asarray(estimator.support_, bool)
            if mask.shape == config.wavelength.shape:
                selected[label] = mask
    png = plots.spectrum_png(spectrum.wavelength, spectrum.flux, config.wavelength,
                             normalised, selected, continuum=continuum, z=float(z[0]))
    return Response(png, mimetype="image/png")


@blueprint.get("/spectra/<obsid>/file")
def spectrum_file(obsid):
    record, path, file_problem = _spectrum_sources(obsid)
    if record is None:
        return error_response(404, f"no spectrum with obsid {obsid}")
    if path is None:
        return error_response(404, file_problem)
    return send_file(path, mimetype=spectra_api.spectrum_file_mime(path), as_attachment=True,
                     download_name=os.path.basename(record["spectrum"]["file_path"]))


# ---------------------------------------------------------------------------------------
# Models and About
# Out-of-sample accuracy a model stores (models.training.train_lasso_mlpnet): the key of
# its metrics and what the predictions were.
ACCURACY_KINDS = (("held_out", "predictions of stars held out from training"),
                  ("cross_fitted", "cross-fitted predictions of the training stars (each "
                                   "star predicted by networks trained without it)"))


def model_evaluation(metrics) -> dict:
    """What a model's stored ``metrics`` hold of its evaluation: ``accuracy`` (per label
    and SNRg bin: n, MAE, mu, sigma of estimate - reference), ``accuracy_what`` and
    ``accuracy_stars`` (how many stars), ``calibration`` (per SNRg bin: calibration
    spectra, and per label the level factor and the coverages of +-1 and +-2 err), and
    the plots they make (``plots``: "accuracy", "coverage"). Empty for metrics without
    them."""
    from models.metrics import snr_bin_names, snr_bins_of

    metrics = metrics or {}
    out = {"plots": []}
    for key, what in ACCURACY_KINDS:
        accuracy = {label: metrics[key][label] for label in LABEL_NAMES
                    if label in (metrics.get(key) or {})}
        if accuracy:
            # "all", then the SNRg bins in order (a JSON column may have sorted the keys)
            out.update(accuracy={label: [(name, per[name]) for name in
                                         ["all", *snr_bin_names(snr_bins_of(per))]]
                                 for label, per in accuracy.items()},
                       accuracy_what=what, accuracy_stars=metrics.get(f"{key}_stars"))
            out["plots"].append("accuracy")
            break
    calibration = metrics.get("calibration")
    if calibration and calibration.get("snr_bins"):
        out["calibration"] = calibration
        out["calibration_bins"] = snr_bin_names(calibration["snr_bins"])
        out["plots"].append("coverage")
    return out


@blueprint.get("/models")
def models_page():
    with state().engine.connect() as connection:
        rows = model_rows(connection)
    return _render("models.html", models=rows, evaluation=model_evaluation,
                   labels=LABEL_NAMES,
                   as_json=lambda value: json.dumps(value, indent=2, sort_keys=True,
                                                    default=str))


@blueprint.get("/models/<version>/<any(accuracy, coverage):plot>.png")
def model_plot(version, plot):
    """The evaluation plots of one model version, drawn from its stored metrics:
    ``accuracy`` MAE and sigma per SNRg bin (:func:`models.plots.accuracy_vs_snr`),
    ``coverage`` of the calibrated uncertainties (:func:`models.plots.coverage_vs_snr`)."""
    from models.metrics import snr_bins_of
    from models.plots import accuracy_vs_snr, coverage_vs_snr

    if re.fullmatch(estimates_api.MODEL_VERSION_PATTERN, version) is None:
        # no stored version looks like this (and PostgreSQL refuses a NUL in text)
        return error_response(404, f"no model version {version!r}")
    with state().engine.connect() as connection:
        metrics = connection.execute(select(schema.models.c.metrics)
                                     .where(schema.models.c.version == version)).first()
    if metrics is None:
        return error_response(404, f"no model version {version!r}")
    evaluation = model_evaluation(metrics[0])
    if plot not in evaluation["plots"]:
        return error_response(404, f"model {version} stores no {plot} summary to plot")
    png = io.BytesIO()
    if plot == "accuracy":
        accuracy = {label: dict(rows) for label, rows in evaluation["accuracy"].items()}
        labels = tuple(accuracy)
        accuracy_vs_snr(png, accuracy, bins=snr_bins_of(accuracy[labels[0]]), labels=labels)
    else:
        calibration = evaluation["calibration"]
        coverage_vs_snr(png, calibration,
                        labels=tuple(label for label in LABEL_NAMES if label in calibration))
    return Response(png.getvalue(), mimetype="image/png")


@blueprint.get("/about")
def about_page():
    limits = state().limits
    return _render("about.html", base=request.host_url.rstrip("/"), teff_range=TEFF_RANGE,
                   feh_min=FEH_MIN, snr_range=SNR_RANGE, flag_bits=sorted(FLAG_DESCRIPTIONS.items()),
                   limits=limits, histogram_bins=HISTOGRAM_BINS)
