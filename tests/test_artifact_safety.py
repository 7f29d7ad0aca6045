"""Model artifacts are code: every load path verifies them before unpickling.

An artifact whose unpickling would create a marker file stands for an attacker's code:
whenever it is refused, the marker must not exist. The file flow (``predict-files``,
``evaluate``, ``validate``) is run through the CLI entry point; the worker flow, with a
real worker and Redis, is in ``test_task_security.py``.
"""
import contextlib
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from etl.cli import main
from models.artifact import (IncompatibleArtifactError, UntrustedArtifactError, artifact_under,
                             code_version, file_sha256, git_commit, load_model, save_model,
                             sidecar_path, write_sidecar)
from models.preprocess import PreprocessConfig

REPO = Path(__file__).resolve().parent.parent


class CreatesFile:
    """Unpickling this creates ``path``: what an attacker's artifact would do, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def evil_bytes(marker):
    return pickle.dumps(CreatesFile(marker))


@pytest.fixture()
def artifact(tmp_path):
    """A real artifact and its sidecar (the model inside does not matter here)."""
    path = tmp_path / "models" / "model.joblib"
    training = {"n_spectra": 3, "obsid_sha256": "ab" * 32}
    version, sha = save_model(path, {"stand-in": "model"}, PreprocessConfig(), training)
    return path, version, sha


def test_an_evil_pickle_does_run_code_when_unpickled(tmp_path):
    # the premise of the tests below: unpickling such a file really creates the marker
    marker = tmp_path / "pwned"
    import joblib

    path = tmp_path / "evil.joblib"
    path.write_bytes(evil_bytes(marker))
    joblib.load(path)
    assert marker.exists()


def test_save_model_writes_a_sidecar_with_hash_versions_and_code_version(artifact):
    path, version, sha = artifact
    record = json.loads(Path(sidecar_path(path)).read_text())
    assert record["sha256"] == sha == file_sha256(path)
    assert record["version"] == version
    assert record["preprocess_hash"] == PreprocessConfig().digest()
    assert record["libraries"]["numpy"] == np.__version__
    import sklearn

    assert record["libraries"]["scikit-learn"] == sklearn.__version__
    assert record["code_version"] == code_version()
    assert load_model(path)["version"] == version


def replace_with_evil(path, marker):
    """Swap the artifact's bytes for an attacker's; the sidecar still has the old hash."""
    Path(path).write_bytes(evil_bytes(marker))


def test_tampered_artifact_is_refused_before_unpickling(artifact, tmp_path):
    path, _, sha = artifact
    marker = tmp_path / "pwned"
    replace_with_evil(path, marker)
    with pytest.raises(UntrustedArtifactError, match=f"SHA-256 .* differs from the {sha}") as info:
        load_model(path)
    assert str(path) in str(info.value) and "not unpickled" in str(info.value)
    assert not marker.exists()


def test_registry_hash_is_checked_as_well_as_the_sidecar(artifact, tmp_path):
    path, version, sha = artifact
    with pytest.raises(UntrustedArtifactError, match="model registry"):
        load_model(path, expected_sha256="0" * 64)
    assert load_model(path, expected_sha256=sha)["version"] == version


def test_artifact_without_sidecar_is_refused_with_a_clear_message(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.joblib"
    path.write_bytes(evil_bytes(marker))
    with pytest.raises(UntrustedArtifactError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message and "no sidecar model.joblib.json" in message
    assert "train-files" in message
    assert not marker.exists()


@pytest.mark.parametrize("recorded", [None, "", "0" * 63, "G" * 64, 42, ["a" * 64]])
def test_a_sidecar_without_a_hash_is_refused_before_unpickling(artifact, tmp_path, recorded):
    """A null hash skipped the check, so the pickle ran (found by review)."""
    path = artifact[0]
    marker = tmp_path / "pwned"
    replace_with_evil(path, marker)
    record = json.loads(Path(sidecar_path(path)).read_text())
    record["sha256"] = recorded
    Path(sidecar_path(path)).write_text(json.dumps(record))
    with pytest.raises(UntrustedArtifactError, match="records no SHA-256") as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("library, recorded, refused", [
    ("numpy", "{other_major}.0.0", True),
    ("scikit-learn", "{major}.{other_minor}.0", True),
    ("scikit-learn", "{major}.{minor}.999", False),
])
def test_library_versions_are_checked_from_the_sidecar_before_unpickling(
        artifact, tmp_path, library, recorded, refused):
    import sklearn

    path = artifact[0]
    running = np.__version__ if library == "numpy" else sklearn.__version__
    major, minor = (int(part) for part in running.split(".")[:2])
    recorded = recorded.format(major=major, minor=minor, other_major=major + 1,
                               other_minor=minor + 1)
    marker = tmp_path / "pwned"
    Path(path).write_bytes(evil_bytes(marker))
    record = json.loads(Path(sidecar_path(path)).read_text())
    record.update(sha256=file_sha256(path))           # the sidecar vouches for these bytes
    record["libraries"][library] = recorded
    Path(sidecar_path(path)).write_text(json.dumps(record))
    if refused:
        with pytest.raises(IncompatibleArtifactError,
                           match=rf"made with {library} {recorded}, running .*retrain") as info:
            load_model(path)
        assert "before unpickling" in str(info.value)
        assert not marker.exists()
    else:
        # a patch release apart: loaded (here: the evil bytes run) with a clear warning
        with pytest.warns(UserWarning, match=rf"made with {library} {recorded}"), \
                pytest.raises(IncompatibleArtifactError, match="not a lamost-vac model artifact"):
            load_model(path)
        assert marker.exists()


def test_preprocessing_hash_is_verified_again_after_loading(artifact):
    import joblib

    path = artifact[0]
    payload = joblib.load(path)
    payload["preprocess"] = PreprocessConfig(wave_max=7400.0)    # not what training hashed
    joblib.dump(payload, path)
    write_sidecar(path, payload)
    with pytest.raises(IncompatibleArtifactError, match="preprocessing configuration hashes to"):
        load_model(path)


def test_artifact_outside_the_model_dir_is_refused(tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    inside = model_dir / "a.joblib"
    inside.write_bytes(b"x")
    outside = tmp_path / "elsewhere" / "b.joblib"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    assert artifact_under(model_dir, inside) == str(inside.resolve())
    for path in (outside, model_dir / ".." / "elsewhere" / "b.joblib"):
        with pytest.raises(UntrustedArtifactError, match="not under the model directory"):
            artifact_under(model_dir, path)
    link = model_dir / "link.joblib"                  # a link out of the folder is outside too
    link.symlink_to(outside)
    with pytest.raises(UntrustedArtifactError, match="LAMOST_VAC_MODEL_DIR"):
        artifact_under(model_dir, link)
    sibling = tmp_path / "models-evil"                # a name that merely starts the same
    sibling.mkdir()
    with pytest.raises(UntrustedArtifactError):
        artifact_under(model_dir, sibling / "c.joblib")


# ----------------------------------------------------------------------- file-flow commands

def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def file_commands(model, tmp_path):
    catalogue = tmp_path / "cat.csv"
    catalogue.write_text("obsid,ra,dec,snrg,z,filename\n")
    return {
        "predict-files": ["predict-files", "--model", model, "--catalog", catalogue,
                          "--spectra-root", tmp_path, "--out", tmp_path / "est.csv"],
        "evaluate": ["evaluate", "--model", model, "--catalog", catalogue, "--spectra-root",
                     tmp_path, "--truth", tmp_path / "truth.csv", "--out", tmp_path / "report"],
        "validate": ["validate", "--model", model, "--spectra", tmp_path, "--out",
                     tmp_path / "validation"],
    }


@pytest.mark.parametrize("command", ["predict-files", "evaluate", "validate"])
def test_file_commands_refuse_a_tampered_artifact_before_unpickling(artifact, tmp_path, command):
    path = artifact[0]
    marker = tmp_path / "pwned"
    replace_with_evil(path, marker)
    code, out, err = run_cli(file_commands(path, tmp_path)[command])
    assert code == 2
    assert "SHA-256" in err and str(path) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


@pytest.mark.parametrize("command", ["predict-files", "evaluate", "validate"])
def test_file_commands_refuse_an_artifact_without_sidecar(tmp_path, command):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.joblib"
    path.write_bytes(evil_bytes(marker))
    code, out, err = run_cli(file_commands(path, tmp_path)[command])
    assert code == 2 and "no sidecar" in err and "Traceback" not in err
    assert not marker.exists()


# ------------------------------------------------------------------------------ code version

def test_code_version_names_the_git_commit_of_the_checkout():
    if not (REPO / ".git").exists():
        pytest.skip("not running from a git checkout")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    version = code_version()
    assert commit in version and version.startswith("0.1.0+git.")
    # the same in a fresh process, and recorded in what gets trained
    fresh = subprocess.run([sys.executable, "-c", "from models.artifact import code_version; "
                            "print(code_version())"], capture_output=True, text=True,
                           check=True, cwd=REPO).stdout.strip()
    assert commit in fresh


def test_code_version_outside_a_checkout_says_unknown(tmp_path):
    assert git_commit(str(tmp_path)) == "unknown"
