"""Headless Chromium driven by Selenium through the system's chromedriver (Debian: `chromium` and
`chromium-driver`, which `make` installs when it may), and the screenshots folder. Where the
browser, the driver or Selenium is missing or will not start, the tests skip and say why."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
# A laptop's window: MLflow's run page leaves its artifact viewer about 600 px of it.
WINDOW = (1440, 900)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "apt-get install chromium chromium-driver (make does it when it runs as root or with sudo)"

_saved: list[Path] = []


def _which(names) -> str | None:
    return next((found for found in map(shutil.which, names) if found), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium (Selenium WebDriver) with a WINDOW-sized window, for the module."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    binary, driver_path = _which(BROWSERS), _which(("chromedriver",))
    if binary is None:
        pytest.skip(f"no Chromium or Chrome on PATH ({', '.join(BROWSERS)}): {INSTALL_HINT}")
    if driver_path is None:
        pytest.skip(f"no chromedriver on PATH: {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(argument)
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    try:
        driver = webdriver.Chrome(service=Service(driver_path, log_output=str(log)), options=options)
    except WebDriverException as error:
        reason = (error.msg or str(error)).strip().splitlines()[0]
        pytest.skip(f"{binary} did not start through {driver_path}: {reason}")
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """build/screenshots/ (gitignored); every path saved there is listed at the end of the run."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


def record_screenshot(path: Path) -> None:
    _saved.append(path)
    print(f"screenshot: {path}")


def pytest_sessionstart(session):
    session.config._screenshots_since = time.time()


def pytest_terminal_summary(terminalreporter, config):
    # Under pytest-xdist the tests run in worker processes: list what this run saved from the folder.
    since = getattr(config, "_screenshots_since", None)
    saved = _saved or sorted(p for p in SCREENSHOTS.glob("*.png") if since and p.stat().st_mtime >= since)
    if saved:
        terminalreporter.section("browser screenshots")
        for path in saved:
            terminalreporter.write_line(str(path))
