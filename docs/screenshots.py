"""Regenerate the README's screenshots: docs/search.png and docs/spectrum.png.

Runs ``lamost-vac demo --no-serve`` into a scratch folder (or uses ``--demo DIR``, the
folder of an earlier demo), serves it with ``lamost-vac serve``, and drives Debian's
headless Chromium (``apt-get install chromium chromium-driver``; pip ``selenium``) through
a search and the first result's spectrum page:

    python docs/screenshots.py [--demo DIR] [--out docs]
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,1000")


def chromium(profile_dir):
    """A headless Chromium driven by chromedriver, with a fresh profile and the browser
    console log kept; the flags keep it off this machine's closed network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    return driver


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(database, model_dir):
    """``lamost-vac serve`` on the demo's catalogue; (process, base URL) once it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMOST_VAC_")}
    env["LAMOST_VAC_MODEL_DIR"] = model_dir
    process = subprocess.Popen(
        [sys.executable, "-m", "etl.cli", "serve", "--url", f"sqlite:///{database}",
         "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5):
                return process, base
        except OSError:
            if process.poll() is not None:
                raise SystemExit(process.stderr.read().decode()[-2000:])
            time.sleep(0.5)
    process.terminate()
    raise SystemExit("lamost-vac serve did not answer")


def take(base, out, profile_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(profile_dir)
    driver.set_window_size(1280, 2000)          # the form, the results and the plots
    try:
        driver.get(f"{base}/?teff_min=4000&teff_max=6500&limit=20")
        WebDriverWait(driver, 120).until(
            expected_conditions.presence_of_element_located((By.ID, "results")))
        search = os.path.join(out, "search.png")
        driver.save_screenshot(search)
        driver.get(driver.find_element(By.CSS_SELECTOR, "#results tbody a")
                   .get_attribute("href"))
        WebDriverWait(driver, 120).until(
            expected_conditions.presence_of_element_located((By.ID, "spectrum-plot")))
        spectrum = os.path.join(out, "spectrum.png")
        driver.save_screenshot(spectrum)
        return [search, spectrum]
    finally:
        driver.quit()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", help="folder of an earlier 'lamost-vac demo' (default: "
                        "run a small one in a scratch folder)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="where the PNG files go (default: docs/)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        demo = args.demo
        if demo is None:
            demo = os.path.join(scratch, "demo")
            subprocess.run([sys.executable, "-m", "etl.cli", "demo", "--no-serve", "--out",
                            demo, "--stars", "60"], check=True)
        process, base = serve(os.path.join(demo, "lamost_vac.db"), os.path.join(demo, "models"))
        try:
            for path in take(base, args.out, os.path.join(scratch, "profile")):
                print(path)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
