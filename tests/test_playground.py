"""The playground page in a real browser: headless Chromium (Debian's chromium + chromium-driver,
which `make setup` installs) driven by selenium, against a live server on 127.0.0.1."""

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from adapterkit.serve import create_app
from test_serve import ADAPTERS, PROMPTS, make_server, world  # noqa: F401

DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "playground.png"


@pytest.fixture(scope="module")
def live_url(world):  # noqa: F811
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = uvicorn.Server(uvicorn.Config(create_app(make_server(world)), log_level="warning"))
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not runner.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    runner.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("headless Chromium is missing: "
                    "`make setup` installs it (apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="adapterkit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1200,800"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_the_playground_streams_answers_side_by_side(browser, live_url, world, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live_url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#models input")) == 7)
    listed = [box.get_attribute("value") for box in browser.find_elements(By.CSS_SELECTOR, "#models input")]
    assert listed[0] == "tiny-base" and set(ADAPTERS) <= set(listed)
    chosen = ["tiny-base", "houlsby", "lora"]
    for box in browser.find_elements(By.CSS_SELECTOR, "#models input"):
        if box.is_selected() != (box.get_attribute("value") in chosen):
            box.click()
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPTS[0])
    for field, value in (("max_tokens", "8"), ("stop", "")):
        element = browser.find_element(By.ID, field)
        element.clear()
        if value:
            element.send_keys(value)
    browser.find_element(By.ID, "run").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".answer[data-state]")) == len(chosen))
    panels = browser.find_elements(By.CSS_SELECTOR, ".answer")
    assert [p.get_attribute("data-model") for p in panels] == chosen
    for panel in panels:
        assert panel.get_attribute("data-state") == "done"
        name = panel.get_attribute("data-model")
        assert panel.find_element(By.TAG_NAME, "pre").text == world["answers"][name, PROMPTS[0]]
        assert "tokens/s" in panel.find_element(By.CLASS_NAME, "stats").text
    screenshot = tmp_path / "playground.png"  # ADAPTERKIT_UPDATE_SCREENSHOT=1 refreshes the README's
    browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes().startswith(b"\x89PNG") and screenshot.stat().st_size > 1000
    if os.environ.get("ADAPTERKIT_UPDATE_SCREENSHOT"):
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)
