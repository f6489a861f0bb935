"""The web console in a real headless Chromium (the system's chromium + chromedriver, driven by Selenium) against a
mesh of real processes: log in, stream a completion in the playground, see the worker's tokens/s on the Mesh page,
watch a running fine-tune's loss and held-out bits/byte curves grow, cancel it.

Skips with the reason when chromium, chromedriver or selenium is missing (CI installs them: .ci/run).
``AXL_TEST_SCREENSHOTS=docs/screenshots`` also saves each page as an optimised 1200x800 PNG (the README's)."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import make_tiny_checkpoint
from tests.e2e.conftest import API_KEY, Mesh
from tests.services.trainer_worker.mesh import PAIRS
from tests.support import ServiceProcess

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover - the dev extra has it
    webdriver = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(
    webdriver is None or not CHROMIUM or not CHROMEDRIVER,
    reason="needs selenium (dev extra) and the system's chromium + chromedriver (apt-get install chromium "
           "chromium-driver); CI installs them",
)
WIDTH, HEIGHT = 1200, 800
SCREENSHOTS = os.environ.get("AXL_TEST_SCREENSHOTS")


@pytest.fixture
def console_mesh(redis_server: str, tmp_path: Path) -> Iterator[tuple[Mesh, ServiceProcess]]:
    """Registry, one `axl-coder` worker, the gateway with the job system, and a trainer that evaluates often."""
    mesh = Mesh(redis_url=redis_server, workdir=tmp_path)
    env = {"AXL_REDIS_URL": redis_server, "AXL_DATA_DIR": str(tmp_path / "data"),
           "AXL_JOBS_KEY_PREFIX": f"axl:console-{tmp_path.name}", "AXL_REAPER_INTERVAL_SECONDS": "1",
           "AXL_HEARTBEAT_INTERVAL_SECONDS": "1", "AXL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    trainer = None
    try:
        mesh.start_registry()
        mesh.start_worker(make_tiny_checkpoint(tmp_path / "coder"), "coder")
        mesh.start_gateway(**env)
        trainer = ServiceProcess("services.trainer_worker", {**env, "AXL_DEFAULT_EVAL_INTERVAL": "5",
                                                             "AXL_CANCEL_GRACE_SECONDS": "5"},
                                 log_path=tmp_path / "trainer.log").start(60)
        yield mesh, trainer
    finally:
        if trainer is not None:
            trainer.stop()
        mesh.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, condition: Any, timeout: float = 30, what: str = "") -> Any:
    # The console re-renders what it updates (a job's status, a stream's text): an element found in one poll can be
    # replaced before the condition reads it, which is a reason to poll again, not a failure.
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition, message=what)


def screenshot(driver: Any, name: str) -> None:
    if not SCREENSHOTS:
        return
    from PIL import Image

    out = Path(SCREENSHOTS)
    out.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    # A 256-colour palette keeps a console page crisp at a fraction of the size.
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out / f"{name}.png", optimize=True)


def test_log_in_stream_watch_a_job_learn_and_cancel_it(console_mesh: tuple[Mesh, ServiceProcess], browser: Any) -> None:
    mesh, _ = console_mesh
    assert mesh.gateway is not None
    ui = mesh.gateway.url.replace("127.0.0.1", "localhost") + "/ui"
    driver = browser

    # Log in: the page asks for the key, then lands where it was going.
    driver.get(ui + "/playground")
    wait(driver, lambda d: "/ui/login" in d.current_url, what="redirect to the login form")
    screenshot(driver, "login")
    driver.find_element(By.ID, "api_key").send_keys("sk-not-the-key")
    driver.find_element(By.ID, "login").click()
    wait(driver, lambda d: "not valid" in d.page_source, what="a wrong key refused")
    driver.find_element(By.ID, "api_key").send_keys(API_KEY)
    driver.find_element(By.ID, "login").click()
    wait(driver, lambda d: d.current_url.endswith("/ui/playground"), what="logged in")
    assert all(API_KEY not in (c.get("value") or "") for c in driver.get_cookies())

    # Playground: a streamed completion, with tokens/s.
    Select(driver.find_element(By.ID, "pg-model")).select_by_value("axl-coder")
    prompt = driver.find_element(By.ID, "pg-prompt")
    prompt.clear()
    prompt.send_keys("def add(a, b):\n")
    driver.find_element(By.ID, "pg-max-tokens").clear()
    driver.find_element(By.ID, "pg-max-tokens").send_keys("64")
    driver.find_element(By.ID, "pg-run").click()
    output = driver.find_element(By.ID, "pg-output")
    wait(driver, lambda d: output.get_attribute("data-done") == "1", 60, "the stream to end")
    stats = driver.find_element(By.ID, "pg-stats").text
    assert "tokens/s" in stats and "done" in stats, stats
    assert driver.find_element(By.CSS_SELECTOR, "#pg-output .generated").text  # text arrived
    screenshot(driver, "playground")

    # Mesh: the worker, ready, with the tokens it generated (tokens/s from the second look on).
    driver.get(ui + "/mesh")
    row = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.worker"), what="the worker row")[0]
    assert "axl-coder" in row.text and "ready" in row.text

    # A fine-tune that runs until cancelled: its curves grow while we watch.
    client = mesh.client()
    train = client.files.create(file=("pairs.jsonl", io.BytesIO(PAIRS.encode())), purpose="fine-tune").id
    held_out = PAIRS.replace("add_", "mul_").replace("a + b", "a * b")  # not a duplicate of a training pair
    valid = client.files.create(file=("valid.jsonl", io.BytesIO(held_out.encode())), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train, validation_file=valid,
                                         suffix="console-demo", hyperparameters={
                                             "max_steps": 100000, "batch_size": 2, "seq_len": 32,
                                             "specialist": "coder"})
    driver.get(f"{ui}/jobs/{job.id}")
    curves = driver.find_element(By.ID, "curves")

    def points(kind: str) -> int:
        return int(curves.get_attribute(f"data-{kind}-points") or 0)

    wait(driver, lambda d: points("loss") >= 2 and points("bpb") >= 1, 240, "loss and bits/byte points")  # generous: a loaded machine
    seen = points("loss")
    wait(driver, lambda d: points("loss") > seen, 30, "the loss curve to grow")
    assert driver.find_element(By.ID, "job-status").text == "running"
    wait(driver, lambda d: "Step" in d.find_element(By.ID, "job-events").text, 10, "metrics events listed")
    screenshot(driver, "job")

    driver.get(ui + "/jobs")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr.ft-job[data-job="{job.id}"]'), what="the job row")
    assert "console-demo" in driver.find_element(By.CSS_SELECTOR, f'tr.ft-job[data-job="{job.id}"]').text
    screenshot(driver, "jobs")

    # Cancel from its page: the job stops at its next step and the page says so without a reload.
    driver.get(f"{ui}/jobs/{job.id}")
    driver.find_element(By.ID, "cancel-job").click()
    wait(driver, lambda d: d.find_element(By.ID, "job-status").text == "cancelled", 60, "the job to be cancelled")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert not driver.find_elements(By.ID, "cancel-job")

    driver.get(ui + "/models")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr.model[data-model="axl-coder"]'), what="the model row")
    screenshot(driver, "models")

    driver.get(ui + "/mesh")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.worker td.tps"), what="the worker row")
    screenshot(driver, "mesh")
    driver.find_element(By.ID, "logout").click()
    wait(driver, lambda d: "/ui/login" in d.current_url, what="logged out")
    driver.get(ui + "/mesh")
    assert "/ui/login" in driver.current_url
