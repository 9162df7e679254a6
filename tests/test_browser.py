"""A real browser (Debian's chromium, driven by Selenium) uploads an X-ray to the page."""

import shutil
import socket
import threading
import time

import pytest
import uvicorn

from lungxray import Predictor, RunDir
from lungxray.serve import create_app
from tests.test_serve import run  # noqa: F401  (the trained-model fixture)

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def server(run):  # noqa: F811
    run_dir, data, cache = run
    app = create_app(Predictor.load(run_dir, cache_dir=cache), RunDir.open(run_dir))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", data
    server.should_exit = True
    thread.join(timeout=10)


def test_page_uploads_and_shows_probabilities_and_heat_map(server, tmp_path):
    if not (CHROMIUM and DRIVER):
        pytest.fail("install Debian's chromium and chromium-driver (.ci/run does) to run the browser test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    url, data = server
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        browser.get(url)
        assert "not a diagnosis" in browser.find_element(By.ID, "notice").text
        image = sorted((data / "test" / "pneumonia").iterdir())[0]
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait = WebDriverWait(browser, 60)
        wait.until(ready.visibility_of_element_located((By.ID, "result")))
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        assert sorted(b.get_attribute("data-class") for b in bars) == ["covid", "normal", "pneumonia"]
        assert browser.find_element(By.ID, "predicted").text in {"covid", "normal", "pneumonia"}
        browser.find_element(By.ID, "toggle").click()
        heatmap = browser.find_element(By.ID, "heatmap")
        assert heatmap.is_displayed() and heatmap.get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return document.getElementById('heatmap').naturalWidth") > 0
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10000
    finally:
        browser.quit()
