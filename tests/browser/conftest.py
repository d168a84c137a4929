"""The web playground in a real browser: one private TorchServe (cam 1.0 + a fine-tuned cam 2.0,
ddpm, sd15), the app (ui/app.py) run by the UI venv's python as `make ui` runs it, and Debian's
headless chromium driven by selenium. Screenshots go to outputs/ui/."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from harness import REPO
from harness.inprocess import demo_weights
from harness.torchserve import TorchServeInstance, free_port
from lab import finetune_cam
from tests.support.shifted import tiny_folder

UI_PYTHON = REPO / ".venv-ui" / "bin" / "python"
SHOTS = REPO / "outputs" / "ui"
WAIT = 180  # seconds for one model call seen from the page (a busy 2-core machine)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    # cam 2.0 as the fine-tuning lab makes it, in a few steps (tests/integration/test_cam_versions.py).
    finetune_cam.finetune(tiny_folder(root / "data", per_class=3), demo_weights("cam"), root / "ft",
                          epochs=1, batch_size=8, threads=1)
    store = root / "store"
    subprocess.run([str(REPO / "archive.sh"), "--store", str(store), "--weights", str(root / "ft"),
                    "--version", "2.0", "cam"], check=True, capture_output=True)
    for name in ("cam.mar", "ddpm.mar", "sd15", "jobs.mar"):
        (store / name).symlink_to(REPO / "model_store" / name)
    with TorchServeInstance(archives=["cam.mar", "cam-2.0.mar", "ddpm.mar", "sd15", "jobs.mar"], source_store=store,
                            load_at_start=False) as ts:
        for name in ("cam.mar", "cam-2.0.mar", "ddpm.mar", "sd15", "jobs.mar"):
            ts.client.register(name, initial_workers=1)
        yield ts


@contextlib.contextmanager
def running_app(inference_url: str, management_url: str, key_file: Path, log: Path):
    """`python -m ui.app` on a free loopback port; yields its URL once it answers."""
    if not UI_PYTHON.exists():
        pytest.fail(f"{UI_PYTHON} missing: `make test` (or `make ui`) installs the UI venv: pip install -e '.[ui]'")
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(UI_PYTHON), "-m", "ui.app", "--port", str(port), "--inference-url", inference_url,
             "--management-url", management_url, "--key-file", str(key_file)],
            cwd=REPO, env={**os.environ, "GRADIO_TEMP_DIR": str(log.parent / "gradio")},
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url, timeout=5).ok:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the app did not answer:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def app(server, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("app") / "app.log"
    with running_app(server.url("inference"), server.url("management"), server.dir / "key_file.json", log) as url:
        yield url


@pytest.fixture(scope="session")
def driver():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver; "
                    "`make test` installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100",
                "--hide-scrollbars"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield drv
    drv.quit()


class Page:
    """The playground as the tests see it: elements by their elem_id, waits, screenshots."""

    def __init__(self, driver, url: str):
        self.driver = driver
        self.url = url
        driver.get(url)
        self.until(lambda: self.driver.find_elements(By.CSS_SELECTOR, "#cam-versions input[type=checkbox]")
                   or self.text("cam-status"), timeout=60)

    def until(self, condition, timeout: float = WAIT, message=lambda: ""):
        """condition() once it is truthy; after `timeout` s a TimeoutException carrying message()."""
        def check(_):
            try:
                return condition()
            except StaleElementReferenceException:  # Gradio re-rendered it meanwhile
                return False
        try:
            return WebDriverWait(self.driver, timeout).until(check)
        except TimeoutException as timeout_:
            raise TimeoutException(f"nothing after {timeout} s: {message()}") from timeout_

    def run(self, button_id: str, result_id: str, predicate, tab: str) -> str:
        """Clicks `button_id` and waits for a NEW text of `result_id` (a DOM mutation after the
        click: a rerun may end with the same text) that satisfies `predicate`; returns it. Fails
        at once with the message when the tab's status line reports an error instead."""
        # An element that is not on the page yet (a hidden column) will be new when it appears.
        self.driver.execute_script(
            "const el = document.getElementById(arguments[0]); window.changed = !el; window.seen = [];"
            "if (el) new MutationObserver(() => { window.changed = true; window.seen.push(el.innerText); })"
            ".observe(el, {subtree: true, childList: true, characterData: true});", result_id)
        self.click(button_id)
        status = f"{tab}-status"
        self.until(lambda: self.text(status).startswith("⚠")
                   or (self.driver.execute_script("return window.changed") and predicate(self.text(result_id))),
                   message=lambda: f"{result_id} shows {self.text(result_id)!r}, {status} {self.text(status)!r}")
        assert not self.text(status).startswith("⚠"), self.text(status)
        return self.text(result_id)

    def seen(self) -> list[str]:
        """Every text the result element of the last run() showed (live progress included)."""
        return [" ".join(text.split()) for text in self.driver.execute_script("return window.seen")]

    def el(self, elem_id: str, css: str = ""):
        """The element `elem_id`, or the first of its descendants matching `css` ("a, b" allowed)."""
        selector = ", ".join(f"#{elem_id} {alt.strip()}" for alt in css.split(",")) if css else f"#{elem_id}"
        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def text(self, elem_id: str) -> str:
        """The element's visible text, whitespace collapsed ('' when it is not on the page)."""
        found = self.driver.find_elements(By.ID, elem_id)
        return " ".join(found[0].text.split()) if found else ""

    def tab(self, title: str) -> None:
        next(t for t in self.driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == title).click()

    def fill(self, elem_id: str, value) -> None:
        field = self.el(elem_id, "input, textarea")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        field.send_keys(str(value))

    def click(self, elem_id: str) -> None:
        button = self.driver.find_element(By.ID, elem_id)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()

    def upload(self, elem_id: str, path: Path) -> None:
        selector = f"#{elem_id} input[type=file]"
        self.until(lambda: self.driver.find_elements(By.CSS_SELECTOR, selector), timeout=20)[0].send_keys(str(path))

    def images(self, elem_id: str) -> list[Image.Image]:
        """The images an output component shows, fetched as the browser fetches them."""
        srcs = [img.get_attribute("src") for img in self.driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")]
        return [Image.open(io.BytesIO(requests.get(src, timeout=30).content)) for src in srcs if src]

    def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        size = self.driver.get_window_size()
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(size["width"], max(size["height"], height + 120))  # the whole page
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(size["width"], size["height"])
        return path


@pytest.fixture
def page(driver, app) -> Page:
    return Page(driver, app)
