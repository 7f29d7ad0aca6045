"""A trained model as one versioned file, and the only way such a file is read back.

The artifact is a joblib file holding a dict: the format version, the model version
string, the preprocessing configuration and its hash, the fitted ``LassoMLPNet`` (scaler,
pixel masks, networks, integrated-uncertainty table), a description of the training set,
metrics, the code version and the versions of the libraries that made it.

**An artifact is code**: unpickling it runs whatever the file says. So an artifact is
never unpickled before its bytes were checked against a SHA-256 recorded *outside* the
pickle: the JSON sidecar ``<artifact>.json`` that :func:`save_model` writes next to it
(``train`` and ``train-files`` both do) and, for a registered model, also the hash of its
``models`` row. :func:`load_model` reads the file once into memory, checks those hashes,
the artifact format and the numpy / scikit-learn versions recorded in the sidecar, and only
then unpickles the very bytes it checked (the file cannot be swapped in between). After
unpickling it re-computes the preprocessing hash: a configuration that no longer hashes to
what training recorded would give other features, so it is refused.
"""
import datetime as _dt
import functools
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import warnings

import joblib
import numpy as np
import sklearn

from .preprocess import PreprocessConfig

ARTIFACT_FORMAT = 2       # 2: PreprocessConfig masked_regions/continuum; out-of-distribution state
SIDECAR_SUFFIX = ".json"
SIDECAR_KEYS = ("sha256", "format", "version", "preprocess_hash", "libraries")
# How much of a library's version must match for its pickles to load (major.minor for
# scikit-learn, whose estimators change between minor releases; major for numpy, whose
# pickles changed module paths in 2.0). Any other difference is a warning.
STRICT_VERSION_PARTS = {"scikit-learn": 2, "numpy": 1}
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class IncompatibleArtifactError(RuntimeError):
    """The artifact was written by a version of lamost-vac this one cannot load."""


class UntrustedArtifactError(IncompatibleArtifactError):
    """The artifact could not be verified (hash, sidecar, location): it was not unpickled."""


class ArtifactVersionWarning(UserWarning):
    """The artifact was made with another patch release of a library it pickles."""


@functools.lru_cache(maxsize=1)
def code_version():
    """``<package version>+git.<commit>`` (``.dirty`` with uncommitted changes to tracked
    files), or ``+git.unknown`` outside a git checkout (an installed wheel)."""
    return f"{package_version()}+git.{git_commit()}"


def package_version():
    try:
        from importlib.metadata import version
        return version("lamost-vac")
    except Exception:     # running from a source tree that was never installed
        return "0"


def git_commit(root=SOURCE_ROOT):
    """The commit of the checkout this code runs from, or ``"unknown"``.

    Only a checkout whose top level holds this package counts: an installed copy inside
    some other repository (a virtualenv in a project folder) has no ``.git`` beside it.
    """
    if not os.path.exists(os.path.join(root, ".git")):
        return "unknown"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*argv):
        return subprocess.run(["git", "-C", root, *argv], capture_output=True, text=True,
                              timeout=20, check=True, env=env).stdout.strip()

    try:
        commit = git("rev-parse", "--verify", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        return "unknown"
    return commit + (".dirty" if dirty else "")


def training_set_description(obsids, snrg, labels):
    """Count, SNR range, label ranges and a hash of the (sorted) obsid list."""
    obsids = np.sort(np.asarray(obsids, dtype=np.int64))
    snrg = np.asarray(snrg, dtype=float)
    return {
        "n_spectra": int(obsids.size),
        "snrg_min": float(np.nanmin(snrg)) if snrg.size else None,
        "snrg_max": float(np.nanmax(snrg)) if snrg.size else None,
        "obsid_sha256": hashlib.sha256(obsids.tobytes()).hexdigest(),
        "label_ranges": {k: [float(np.nanmin(v)), float(np.nanmax(v))] for k, v in labels.items()},
    }


def new_model_version(training_description):
    """``lmn-YYYYmmddTHHMMSS.ffffff-<8 hex of the training set>``: sortable and traceable.
    The microseconds keep apart two models of one training set made within a second (a
    model and its ``calibrate-repeats`` successor on a fast machine had one version)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
    return f"lmn-{stamp}-{training_description['obsid_sha256'][:8]}"


def library_versions():
    return {"numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "joblib": joblib.__version__, "python": platform.python_version()}


def save_model(path, model, config, training, metrics=None, version=None, extra=None):
    """Write the artifact and its sidecar; returns ``(version, sha256 of the artifact)``."""
    version = version or new_model_version(training)
    payload = {
        "format": ARTIFACT_FORMAT,
        "version": version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "code_version": code_version(),
        "preprocess": config,
        "preprocess_hash": config.digest(),
        "model": model,
        "training": training,
        "metrics": metrics or {},
        "extra": extra or {},
        "libraries": library_versions(),
    }
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _replace_atomically(path, lambda temporary: joblib.dump(payload, temporary, compress=3))
    return version, write_sidecar(path, payload)


def sidecar_path(path):
    return os.fspath(path) + SIDECAR_SUFFIX


def write_sidecar(path, payload):
    """Record the artifact's SHA-256 and what it was made with next to it; returns the hash.

    Written after the artifact: a crash in between leaves an artifact without a sidecar,
    which :func:`load_model` refuses.
    """
    sha256 = file_sha256(path)
    record = {
        "about": "lamost-vac model artifact: it is unpickled only if its SHA-256 matches",
        "artifact": os.path.basename(os.fspath(path)),
        "sha256": sha256,
        **{key: payload.get(key) for key in ("format", "version", "created", "code_version",
                                             "preprocess_hash", "libraries")},
    }
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    _replace_atomically(sidecar_path(path), lambda temporary: _write_text(temporary, text))
    return sha256


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _replace_atomically(path, write):
    """``write(temporary path)`` then rename: readers never see a half-written file."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_sidecar(path):
    """The sidecar of the artifact at ``path``, checked for the keys loading needs."""
    side = sidecar_path(path)
    try:
        with open(side, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        raise UntrustedArtifactError(
            f"{path}: no sidecar {os.path.basename(side)} recording the artifact's SHA-256, so "
            "it is not unpickled (artifacts are code). Use an artifact written by 'lamost-vac "
            "train' or 'train-files', which writes the sidecar next to it") from None
    except (OSError, ValueError) as error:
        raise UntrustedArtifactError(f"{path}: unreadable sidecar {side}: {error}") from None
    missing = [key for key in SIDECAR_KEYS if not isinstance(record, dict) or key not in record]
    if missing or not isinstance(record.get("libraries"), dict):
        raise UntrustedArtifactError(f"{path}: sidecar {side} lacks {', '.join(missing) or 'libraries'}")
    # the hash the artifact is checked against: never absent (a null would skip the check)
    if not (isinstance(record["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", record["sha256"])):
        raise UntrustedArtifactError(f"{path}: sidecar {side} records no SHA-256 (64 hex digits) "
                                     f"but {str(record['sha256'])[:80]!r}, so the artifact is not unpickled")
    return record


def check_library_versions(path, made_with):
    """Refuse an artifact pickled by a library version whose pickles this one cannot load."""
    running = {"numpy": np.__version__, "scikit-learn": sklearn.__version__}
    for name, parts in STRICT_VERSION_PARTS.items():
        recorded = made_with.get(name)
        if not isinstance(recorded, str):
            raise UntrustedArtifactError(f"{path}: its sidecar does not record the {name} version")
        if recorded.split(".")[:parts] != running[name].split(".")[:parts]:
            raise IncompatibleArtifactError(
                f"{path}: made with {name} {recorded}, running {running[name]}; pickled "
                f"models are not portable across {name} {'.'.join(['major', 'minor'][:parts])} "
                "versions: retrain (checked before unpickling)")
        if recorded != running[name]:
            warnings.warn(f"{path}: made with {name} {recorded}, running {running[name]}",
                          ArtifactVersionWarning, stacklevel=3)


def load_model(path, expected_sha256=None):
    """Read an artifact after verifying it (module doc); ``expected_sha256``: the hash the
    model registry records, checked as well as the sidecar's."""
    path = os.fspath(path)
    with open(path, "rb") as handle:            # a missing file: FileNotFoundError
        data = handle.read()
    sidecar = read_sidecar(path)
    actual = hashlib.sha256(data).hexdigest()
    for recorded, where in ((sidecar["sha256"], f"its sidecar {os.path.basename(sidecar_path(path))}"),
                            (expected_sha256, "the model registry")):
        if recorded is not None and actual != recorded:
            raise UntrustedArtifactError(
                f"{path}: SHA-256 {actual} differs from the {recorded} that {where} records: "
                "the file was changed or replaced after training; not unpickled")
    if sidecar["format"] != ARTIFACT_FORMAT:
        raise IncompatibleArtifactError(
            f"{path}: artifact format {sidecar['format']}, this lamost-vac reads format "
            f"{ARTIFACT_FORMAT}; retrain with 'lamost-vac train-files' or install the version "
            f"that wrote it ({sidecar.get('code_version')})")
    check_library_versions(path, sidecar["libraries"])
    try:
        payload = joblib.load(io.BytesIO(data))
    except Exception as error:
        raise IncompatibleArtifactError(f"{path}: not a lamost-vac model artifact ({error})") from error
    if not isinstance(payload, dict) or not {"format", "version", "model", "preprocess"} <= set(payload):
        raise IncompatibleArtifactError(f"{path}: not a lamost-vac model artifact")
    if payload["version"] != sidecar["version"]:
        raise IncompatibleArtifactError(
            f"{path}: holds model {payload['version']}, its sidecar names {sidecar['version']}")
    check_preprocessing(path, payload, sidecar["preprocess_hash"])
    return payload


def check_preprocessing(path, payload, recorded):
    """The configuration must still hash to what training recorded (else other features)."""
    config = payload["preprocess"]
    if not isinstance(config, PreprocessConfig):
        raise IncompatibleArtifactError(f"{path}: preprocessing configuration missing")
    digest = config.digest()
    if not digest == payload.get("preprocess_hash") == recorded:
        raise IncompatibleArtifactError(
            f"{path}: its preprocessing configuration hashes to {digest} with this code, training "
            f"recorded {payload.get('preprocess_hash')} (sidecar {recorded}): the preprocessing "
            "changed since, the features would differ: retrain")


def artifact_under(model_dir, path):
    """``path`` resolved (symbolic links followed), refused unless it lies under ``model_dir``.

    The model registry names an artifact by path; only files under the operator's
    LAMOST_VAC_MODEL_DIR are trusted enough to be unpickled.
    """
    root = os.path.realpath(model_dir)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise UntrustedArtifactError(
            f"{path}: not under the model directory {root} (LAMOST_VAC_MODEL_DIR); artifacts "
            "are code and are loaded only from there: refused")
    return real


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
