"""The validators a release file must pass: STILTS ``votlint`` for VOTable and HEASARC
``fitsverify`` for FITS (Debian packages ``stilts`` and ``fitsverify``, installed by
.ci/run). Any message of either, warning or error, fails the calling test."""
import re
import shutil
import subprocess

from conftest import service_unavailable

STILTS = shutil.which("stilts")
FITSVERIFY = shutil.which("fitsverify")
_FITSVERIFY_SUMMARY = re.compile(r"Verification found (\d+) warning\(s\) and (\d+) error\(s\)")


def assert_valid_votable(path):
    """``stilts votlint validate=true`` (XML schema, IDs, datatypes, UCDs, units) is silent
    on a valid document; it exits 0 either way, so its output is what counts."""
    if STILTS is None:
        service_unavailable("STILTS not installed (Debian: apt-get install -y stilts)")
    report = subprocess.run([STILTS, "votlint", "validate=true", f"votable={path}"],
                            capture_output=True, text=True, timeout=300)
    messages = [line for line in (report.stdout + report.stderr).splitlines()
                if line.strip() and not line.startswith("Picked up ")]   # JVM option notices
    assert report.returncode == 0 and not messages, (str(path), messages)


def assert_valid_fits(path):
    """``fitsverify`` (the HEASARC FITS standard checker): no warnings, no errors."""
    if FITSVERIFY is None:
        service_unavailable("fitsverify not installed (Debian: apt-get install -y fitsverify)")
    report = subprocess.run([FITSVERIFY, str(path)], capture_output=True, text=True,
                            timeout=300)
    output = report.stdout + report.stderr
    summary = _FITSVERIFY_SUMMARY.search(output)
    assert summary, output
    warnings, errors = map(int, summary.groups())
    assert (warnings, errors) == (0, 0) and report.returncode == 0, output
