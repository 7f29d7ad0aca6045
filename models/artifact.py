"""A trained model as one versioned file: everything needed to reproduce its estimates.

The artifact is a joblib file holding a dict: the format version, the model version
string, the preprocessing configuration, the fitted ``LassoMLPNet`` (scaler, pixel masks,
networks, integrated-uncertainty table), a description of the training set, metrics and
the versions of the libraries that made it.
"""
import datetime as _dt
import hashlib
import os
import platform

import joblib
import numpy as np
import sklearn

from .preprocess import PreprocessConfig

ARTIFACT_FORMAT = 2       # 2: PreprocessConfig masked_regions/continuum; out-of-distribution state


class IncompatibleArtifactError(RuntimeError):
    """The artifact was written by a version of lamost-vac this one cannot load."""


def code_version():
    try:
        from importlib.metadata import version
        return version("lamost-vac")
    except Exception:     # running from a source tree that was never installed
        return "0+unknown"


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
    """``lmn-YYYYmmddTHHMMSS-<8 hex of the training set>``: sortable and traceable."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"lmn-{stamp}-{training_description['obsid_sha256'][:8]}"


def save_model(path, model, config, training, metrics=None, version=None, extra=None):
    """Write the artifact; returns ``(version, sha256 of the file)``."""
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
        "libraries": {"numpy": np.__version__, "scikit-learn": sklearn.__version__,
                      "joblib": joblib.__version__, "python": platform.python_version()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    joblib.dump(payload, path, compress=3)
    return version, file_sha256(path)


def load_model(path):
    """Read an artifact, refusing one of another format or scikit-learn major.minor."""
    try:
        payload = joblib.load(path)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise IncompatibleArtifactError(f"{path}: not a lamost-vac model artifact ({error})") from error
    if not isinstance(payload, dict) or not {"format", "libraries", "model"} <= set(payload):
        raise IncompatibleArtifactError(f"{path}: not a lamost-vac model artifact")
    if payload["format"] != ARTIFACT_FORMAT:
        raise IncompatibleArtifactError(
            f"{path}: artifact format {payload['format']}, this lamost-vac reads format "
            f"{ARTIFACT_FORMAT}; retrain with 'lamost-vac train-files' or install the version "
            f"that wrote it ({payload.get('code_version')})")
    made_with = payload["libraries"]["scikit-learn"]
    if made_with.split(".")[:2] != sklearn.__version__.split(".")[:2]:
        raise IncompatibleArtifactError(
            f"{path}: made with scikit-learn {made_with}, running {sklearn.__version__}; "
            "pickled estimators are not portable across scikit-learn versions: retrain")
    if not isinstance(payload["preprocess"], PreprocessConfig):
        raise IncompatibleArtifactError(f"{path}: preprocessing configuration missing")
    return payload


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
