"""A real browser on a real server: headless Chromium opens the page of `aivh-ens serve` (uvicorn on
127.0.0.1, started by the CLI), uploads a demo image through the file input and reads the probability."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import httpx
import pytest
from cli_checks import EXE
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
from serve_project import Project

from aivh_ens.infer import predict_images

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> dict:
    """Poll ``/health`` until the server is warm (bounded; fails early if the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
        try:
            h = httpx.get(f"{url}/health", timeout=2).json()
            if h.get("warm"):
                return h
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server at {url} was not ready within {timeout:g} s")


@pytest.fixture
def server(project: Project, tmp_path):
    """``aivh-ens serve`` on a free port of 127.0.0.1, stopped (terminate, then kill) after the test."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below, after the process ends
    proc = subprocess.Popen(
        [
            EXE,
            "serve",
            "--workdir",
            str(project.work),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--threads",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture
def browser(tmp_path):
    for exe in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(exe), f"{exe} is missing: apt-get install -y chromium chromium-driver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1000,700",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_uploads_an_image_and_shows_its_probability(project, server, browser, tmp_path):
    image = project.images[0]
    (want,), _ = predict_images([image], project.work, device="cpu")
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "ready"))
    browser.find_element(By.ID, "files").send_keys(str(image))
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "li.result.done")))
    shown = row.find_element(By.CLASS_NAME, "prob").text
    browser.save_screenshot(str(tmp_path / "serve-page.png"))
    assert row.find_element(By.CLASS_NAME, "name").text == image.name
    assert shown == f"{want.prob:.4f}"
    assert abs(float(row.get_attribute("data-prob")) - want.prob) < 1e-6
    assert row.find_element(By.CLASS_NAME, "label").text == ("AI" if want.label else "human")
    bar, fill = row.find_element(By.CLASS_NAME, "bar"), row.find_element(By.CLASS_NAME, "fill")
    assert abs(fill.size["width"] - want.prob * bar.size["width"]) <= 2  # the bar shows P(AI)
    assert (tmp_path / "serve-page.png").stat().st_size > 1000
