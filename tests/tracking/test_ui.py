"""End to end: ``snopt ui`` on the default store, opened in a headless Chromium.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs
them) and selenium; it skips, saying so, only where Chromium or its driver is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from snopt.tracking import MlflowCallback

STEPS = 6
EXPERIMENT = "snopt"
RUN_NAME = "toy · sgd · fixed"


def _chromium() -> tuple[str | None, str | None]:
    names = ("chromium", "chromium-browser", "google-chrome")
    browser = next((path for name in names if (path := shutil.which(name))), None)
    return browser, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, processes, toy):
    """A run in the default store of a fresh folder, and ``snopt ui`` started there.

    Yields ``(url, run_id, experiment_link)``, the link as `snopt ui` printed it; the UI process
    group is stopped afterwards.
    """
    root = tmp_path_factory.mktemp("ui")
    callback = MlflowCallback(
        {"task": "toy", "optimizer": "sgd", "control": "fixed"},
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        system_metrics=False,
        log_model=False,
    )
    result = toy.fit([callback], max_steps=STEPS, eval_every=3)
    assert result.status == "completed"

    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # `snopt ui` must find ./mlflow.db by itself
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    port = processes.free_port()
    log = root / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snopt.cli", "ui", "--port", str(port)],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        match = None
        while match is None and time.monotonic() < deadline and proc.poll() is None:
            match = re.search(r"MLflow UI for (\S+): (http://\S+)", log.read_text())
            time.sleep(0.1)
        assert match is not None, f"`snopt ui` printed no URL:\n{log.read_text()[-3000:]}"
        assert match.group(1) == f"sqlite:///{root / 'mlflow.db'}"
        url = match.group(2)
        link = None
        while link is None and time.monotonic() < deadline and proc.poll() is None:
            link = re.search(rf"experiment '{EXPERIMENT}': (http://\S+)", log.read_text())
            time.sleep(0.1)
        assert link is not None, f"`snopt ui` printed no experiment link:\n{log.read_text()[-3000:]}"
        processes.wait_healthy(url, proc, 180, log)
        yield url, callback.run_id, link.group(1)
    finally:
        processes.stop_group(proc)


def test_snopt_ui_serves_the_default_store_on_localhost(ui_server):
    from mlflow import MlflowClient

    url, run_id, link = ui_server
    assert url == f"http://127.0.0.1:{url.rsplit(':', 1)[1]}"
    client = MlflowClient(url)
    run = client.get_run(run_id)
    assert run.info.run_name == RUN_NAME
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert len(client.get_metric_history(run_id, "train_loss")) == STEPS
    assert link.startswith(f"{url}/#/experiments/{run.info.experiment_id}")


def test_browser_finds_the_run_and_renders_its_loss_chart(ui_server, tmp_path):
    browser, driver_path = _chromium()
    if browser is None or driver_path is None:
        pytest.skip(
            "Chromium or chromedriver not found on PATH (Debian: apt-get install chromium chromium-driver); "
            f"found browser={browser}, driver={driver_path}"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, run_id, link = ui_server
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    screenshot = tmp_path / "mlflow-ui-train-loss.png"
    try:
        wait = WebDriverWait(driver, 60)
        # The experiment's link as `snopt ui` printed it, in a fresh browser profile: it must open
        # on the runs (MLflow 3 otherwise opens an experiment on its GenAI traces page).
        driver.get(link)
        # Its runs: open ours.
        run_link = wait.until(EC.element_to_be_clickable((By.XPATH, f"//a[normalize-space()='{RUN_NAME}']")))
        assert run_id in run_link.get_attribute("href")
        run_link.click()
        # The run's metric charts: keep the train_loss chart and wait for it to be drawn.
        wait.until(
            EC.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Model metrics']"))
        ).click()
        search = wait.until(
            EC.element_to_be_clickable((By.CSS_SELECTOR, "input[placeholder='Search metric charts']"))
        )
        search.send_keys("train_loss")

        def charts(drv):
            return drv.execute_script(
                """return Array.from(document.querySelectorAll('.js-plotly-plot')).map(p => ({
                       title: (p.closest('[data-testid]') || p.parentElement.parentElement).innerText,
                       line: Math.max(0, ...Array.from(p.querySelectorAll('path.js-line'))
                                              .map(x => (x.getAttribute('d') || '').length)),
                       points: p.querySelectorAll('.point').length}));"""
            )

        # Only the searched chart is left once the filter has applied, and it is drawn.
        drawn = wait.until(
            lambda drv: (
                (c := charts(drv)) and len(c) == 1 and c[0]["points"] == STEPS and c[0]["line"] > 0 and c
            )
        )
        assert "train_loss" in driver.find_element(By.TAG_NAME, "body").text
        assert drawn[0]["points"] == STEPS
        assert driver.save_screenshot(str(screenshot))
    except Exception:
        # Leave what the browser showed next to the test's files, for whoever reads the failure.
        driver.save_screenshot(str(tmp_path / "failure.png"))
        (tmp_path / "failure.txt").write_text(driver.find_element(By.TAG_NAME, "body").text)
        print(f"browser state at failure: {tmp_path / 'failure.png'}, {tmp_path / 'failure.txt'}")
        raise
    finally:
        driver.quit()
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    print(f"screenshot: {screenshot}")
