"""The pages for people in a real headless browser: Debian's chromium driven by Selenium
(chromium-driver), against ``lamost-vac serve`` on the catalogue ``lamost-vac demo``
builds (real spectrum files, a real model artifact). Submits the form, pages through the
results, opens a spectrum page and the models page, checks that the plots are loaded
images of non-zero size and that the browser logs no console error; screenshots go to the
test's tmp folder.

Needs ``apt-get install chromium chromium-driver`` and ``pip install selenium`` (.ci/run
and the ``test`` extra install them)."""
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


def click_and_load(browser, by, value):
    """Click the element and wait until the page it leads to has replaced this one (a
    click on a submit button or link returns before the next page has loaded).

    The old page is marked by a property of its window, which the new page does not have.
    (Waiting for an element of the old page to go stale asks chromedriver about a node
    that may be detached mid-question; it then answers "unknown error: Node with given id
    does not belong to the document" instead of "stale element".)"""
    browser.execute_script("window.lamostVacOldPage = true")
    browser.find_element(by, value).click()
    WebDriverWait(browser, 60, ignored_exceptions=(WebDriverException,)).until(
        lambda b: b.execute_script(
            "return window.lamostVacOldPage === undefined"
            " && document.readyState === 'complete'"))


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))
import screenshots  # noqa: E402  (docs/screenshots.py: the README's pictures)

PAGE_SIZE = 20


@pytest.fixture(scope="module")
def server(sqlite_demo):
    """``lamost-vac serve`` on the demo's catalogue (conftest), as docs/screenshots.py
    starts it."""
    out, _ = sqlite_demo
    process, base = screenshots.serve(out / "lamost_vac.db", str(out / "models"))
    yield base
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("apt-get install chromium chromium-driver")
    driver = screenshots.chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def test_readme_screenshots_script_draws_both_pages(server, tmp_path):
    """docs/screenshots.py (what regenerates the README's pictures) on the same demo."""
    paths = screenshots.take(server, str(tmp_path), str(tmp_path / "profile"))
    for path in paths:
        with open(path, "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 20_000, path      # a rendered page, not a blank one


def console_errors(driver, allowed=()):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
            and not any(text in entry["message"] for text in allowed)]


def image_size(driver, element_id):
    """(naturalWidth, naturalHeight) of a loaded image, waiting for it to finish."""
    image = driver.find_element(By.ID, element_id)
    for _ in range(600):
        if driver.execute_script("return arguments[0].complete", image):
            break
        time.sleep(0.1)
    assert image.get_attribute("alt"), f"{element_id} has no alt text"
    return tuple(driver.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image))


def table_obsids(driver):
    return [int(cell.text) for cell in
            driver.find_elements(By.CSS_SELECTOR, "#results tbody tr td:first-child a")]


def test_search_page_through_and_open_a_spectrum(server, browser, tmp_path):
    browser.get(server + "/")
    assert browser.find_element(By.CSS_SELECTOR, "label[for=teff_min]").is_displayed()
    browser.find_element(By.ID, "teff_min").send_keys("3000")
    browser.find_element(By.ID, "feh_min").send_keys("-3")
    Select(browser.find_element(By.ID, "limit")).select_by_value(str(PAGE_SIZE))
    click_and_load(browser, By.ID, "search-button")
    assert browser.find_element(By.ID, "results").is_displayed()
    for plot in ("kiel-plot", "histograms-plot"):
        width, height = image_size(browser, plot)
        assert width > 0 and height > 0, plot
    browser.save_screenshot(str(tmp_path / "search.png"))
    assert console_errors(browser) == []

    # the ADQL of the same selection is shown; the embedded SQLite has no TAP to run it
    assert browser.find_element(By.ID, "adql").get_attribute("value").startswith("SELECT obsid")
    assert browser.find_element(By.ID, "no-tap").is_displayed()
    # the API URL on the page answers the same rows; the next links walk all of them
    api_url = browser.find_element(By.ID, "api-url").get_attribute("value")
    first_page = json.load(urllib.request.urlopen(api_url, timeout=60))
    assert [r["obsid"] for r in first_page["rows"]] == table_obsids(browser)
    everything = api_url.replace(f"limit={PAGE_SIZE}", "limit=1000")
    expected = [r["obsid"] for r in json.load(urllib.request.urlopen(everything))["rows"]]
    seen, pages = table_obsids(browser), 1
    while browser.find_elements(By.ID, "next-page"):
        click_and_load(browser, By.ID, "next-page")
        seen += table_obsids(browser)
        pages += 1
    assert pages >= 3 and seen == expected
    assert browser.find_elements(By.ID, "last-page")
    assert console_errors(browser) == []

    # a spectrum page: both plots of the file, LASSO pixels of the current model marked
    click_and_load(browser, By.CSS_SELECTOR, "#results tbody a")
    width, height = image_size(browser, "spectrum-plot")
    assert width > 0 and height > 0
    assert not browser.find_elements(By.ID, "artifact-problem")
    caption = browser.find_element(By.TAG_NAME, "figcaption").text
    assert "pixels LASSO selected" in caption and "Teff:" in caption
    assert "current" in browser.find_element(By.ID, "estimates").text
    json_link = browser.find_element(By.ID, "json-link").get_attribute("href")
    assert json.load(urllib.request.urlopen(json_link))["estimates"]
    assert browser.find_element(By.ID, "fits-link").get_attribute("href").endswith("/file")
    browser.save_screenshot(str(tmp_path / "spectrum.png"))
    assert console_errors(browser) == []

    for path in ("/models", "/about"):
        browser.get(server + path)
        assert browser.find_element(By.TAG_NAME, "h1").text
        browser.save_screenshot(str(tmp_path / f"{path.strip('/')}.png"))
        if path == "/models":
            # the demo model's stored accuracy and calibration, drawn
            plots = browser.find_elements(By.CSS_SELECTOR, "img.model-plot")
            assert len(plots) == 2
            for plot in plots:
                width, height = image_size(browser, plot.get_attribute("id"))
                assert width > 0 and height > 0
    assert console_errors(browser) == []
    for name in ("search", "spectrum", "models", "about"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_bad_input_is_shown_next_to_the_field_in_the_browser(server, browser, tmp_path):
    browser.get(server + "/")
    browser.find_element(By.ID, "ra").send_keys("not an angle")
    browser.find_element(By.ID, "dec").send_keys("10")
    browser.find_element(By.ID, "radius").send_keys("2 arcmin")
    click_and_load(browser, By.ID, "search-button")
    message = browser.find_element(By.ID, "ra-error")
    assert message.is_displayed() and "not a right ascension" in message.text
    assert browser.find_element(By.ID, "ra").get_attribute("aria-invalid") == "true"
    assert browser.find_element(By.ID, "ra").get_attribute("value") == "not an angle"
    assert not browser.find_elements(By.ID, "results")
    browser.save_screenshot(str(tmp_path / "bad-input.png"))
    # the 400 of the answer itself is the only thing the browser reports
    assert console_errors(browser, allowed=("status of 400",)) == []
