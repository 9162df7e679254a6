"""A real browser (Debian's chromium, driven by Selenium) uploads an X-ray, then a picture that is no X-ray."""

import shutil
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from PIL import Image

from lungxray import KerasPredictor, RunDir
from lungxray.serve import create_app

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def noise_photo(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def server(run, tmp_path):
    """The app, its gate's threshold set between a test X-ray's score and a noise photo's, so that
    the photo is flagged and the X-ray is not."""
    run_dir, data, cache = run
    predictor = KerasPredictor.load(run_dir, cache_dir=cache)
    xray, photo = sorted((data / "test" / "pneumonia").iterdir())[0], noise_photo(tmp_path / "photo.png")
    scores = predictor.predict_files([xray, photo]).ood_score
    assert scores[1] > scores[0], "the noise photo must look less like the training X-rays than an X-ray does"
    predictor.ood.threshold = float(scores.mean())
    app = create_app(predictor, RunDir.open(run_dir))
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
    yield f"http://127.0.0.1:{port}/", xray, photo
    server.should_exit = True
    thread.join(timeout=10)


def test_page_uploads_and_shows_probabilities_and_heat_map(server, tmp_path):
    if not (CHROMIUM and DRIVER):
        pytest.fail("install Debian's chromium and chromium-driver (.ci/run does) to run the browser test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, xray, photo = server
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    wait = WebDriverWait(browser, 60)

    def upload(path):
        browser.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda _: browser.find_element(By.ID, "status").text == ""
                   and browser.find_element(By.ID, "result").is_displayed()
                   and browser.execute_script("return document.getElementById('preview').complete"))

    try:
        browser.get(url)
        assert "not a diagnosis" in browser.find_element(By.ID, "notice").text
        upload(xray)
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        assert sorted(b.get_attribute("data-class") for b in bars) == ["covid", "normal", "pneumonia"]
        assert browser.find_element(By.ID, "predicted").text in {"covid", "normal", "pneumonia"}
        assert not browser.find_element(By.ID, "ood").is_displayed()
        assert not browser.find_element(By.ID, "heatmap").is_displayed()  # not asked for
        browser.find_element(By.ID, "toggle").click()
        heatmap = browser.find_element(By.ID, "heatmap")
        assert heatmap.is_displayed() and heatmap.get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return document.getElementById('heatmap').naturalWidth") > 0
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10000
        browser.find_element(By.ID, "toggle").click()  # heat map off again, then a picture that is no X-ray
        browser.find_element(By.ID, "file").clear()
        upload(photo)
        wait.until(lambda _: browser.find_element(By.ID, "ood").is_displayed())
        assert "does not look like the chest X-rays" in browser.find_element(By.ID, "ood").text
        assert browser.find_element(By.ID, "predicted").text == "withheld"
        assert not browser.find_element(By.ID, "bars").is_displayed()
        assert not browser.find_element(By.ID, "heatmap").is_displayed()
        assert browser.find_element(By.ID, "preview").is_displayed()
        browser.save_screenshot(str(tmp_path / "flagged.png"))
    finally:
        browser.quit()
