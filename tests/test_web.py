"""`spoold web` for real: the page served by Uvicorn, driven in headless Chromium (Debian's, through its
WebDriver), a task going from queued to done live, its answer rendered and escaped; CSRF, the token, /metrics."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from conftest import ROOT, wait_for, write_config

from spoold import api, spool

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
MARKDOWN_ECHO = [sys.executable, "-c", "import sys; sys.stdin.read(); "
                 "print('# Rayleigh\\n\\nShort waves **scatter** more. <script>alert(1)</script>')"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """`spoold web` as a subprocess on a free port of 127.0.0.1 (or another host address, with its token)."""

    def __init__(self, sp: spool.Spool, host: str = "127.0.0.1") -> None:
        self.port = _free_port()
        self.url = f"http://{host}:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "spoold.cli", "web", "--spool", str(sp.root), "--host", host,
                                      "--port", str(self.port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     cwd=ROOT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        self.banner = self.proc.stdout.readline()
        wait_for(lambda: self._up(), what="the page")

    def _up(self) -> bool:
        try:
            urllib.request.urlopen(self.url + "/metrics", timeout=1)
            return True
        except urllib.error.HTTPError:
            return True  # answering, if only to say it needs a token
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def web(sp: spool.Spool) -> Iterator[Page]:
    p = Page(sp)
    yield p
    p.stop()


@pytest.fixture
def browser() -> Iterator[object]:
    if not (CHROMIUM and DRIVER):
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _text(browser: object, by: str, what: str) -> str | None:
    """An element's text, or None while the page is replacing it (a live update swaps the rows in)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return browser.find_element(by, what).text  # type: ignore[attr-defined]
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def _click(browser: object, by: str, what: str) -> None:
    """Click, again if a live reload replaced the element between finding and clicking it."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def once() -> bool:
        try:
            browser.find_element(by, what).click()  # type: ignore[attr-defined]
            return True
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    wait_for(once, what=f"a click on {what}")


def test_the_page_shows_a_task_go_from_queued_to_done_live_and_renders_its_answer(sp, web, browser, daemon) -> None:
    from selenium.webdriver.common.by import By

    write_config(sp, backend="command", command=MARKDOWN_ECHO)
    tid = api.submit(sp, "Why is the sky blue?", title="Sky colour").id
    browser.get(web.url + "/")
    wait_for(lambda: _text(browser, By.CSS_SELECTOR, f'tr[data-id="{tid}"] td.state') == "queued",
             what="the row, queued")  # through the helper: the submit's own change may still reload the rows
    daemon(sp)  # the page is already open: the change must come to it, not be reloaded
    wait_for(lambda: _text(browser, By.CSS_SELECTOR, f'tr[data-id="{tid}"] td.state') == "done",
             what="the row to turn done by itself")
    _click(browser, By.LINK_TEXT, "Sky colour")

    def rendered() -> tuple[str, str, str, int] | None:  # read in one go: a late change may reload the page
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        try:
            answer = browser.find_element(By.ID, "answer")
            return (answer.find_element(By.TAG_NAME, "h1").text, answer.find_element(By.TAG_NAME, "strong").text,
                    answer.text, len(answer.find_elements(By.TAG_NAME, "script")))
        except (NoSuchElementException, StaleElementReferenceException):
            return None

    heading, bold, text, scripts = wait_for(rendered, what="the rendered answer")  # type: ignore[misc]
    assert (heading, bold) == ("Rayleigh", "scatter")
    assert "<script>alert(1)</script>" in text and scripts == 0  # shown as text, never run


def test_the_page_submits_and_cancels_through_the_api(sp, web, browser) -> None:
    from selenium.webdriver.common.by import By

    browser.get(web.url + "/")
    browser.find_element(By.NAME, "prompt").send_keys("Queued from the page")
    browser.find_element(By.NAME, "title").send_keys("From the page")
    browser.find_element(By.XPATH, "//button[text()='queue it']").click()
    wait_for(lambda: "/task/" in browser.current_url, what="the task's page")
    tid = browser.current_url.rsplit("/", 1)[1]
    assert api.info(sp, tid).state == "queued" and api.info(sp, tid).title == "From the page"
    wait_for(lambda: "#1, starts ~" in (_text(browser, By.TAG_NAME, "table") or ""), what="its place in the queue")
    _click(browser, By.XPATH, "//button[text()='cancel']")
    wait_for(lambda: _text(browser, By.ID, "state") == "cancelled", what="cancelled on the page")
    assert api.info(sp, tid).state == "cancelled"


def test_a_change_without_the_page_s_token_is_refused(sp, web) -> None:
    tid = api.submit(sp, "keep me").id
    for path, data in (("/submit", b"prompt=forged"), (f"/task/{tid}/cancel", b"")):
        req = urllib.request.Request(web.url + path, data=data, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=5)
        assert refused.value.code == 403
    assert api.info(sp, tid).state == "queued" and len(spool.list_queued(sp)) == 1


def test_bound_beyond_loopback_the_page_asks_for_its_token(sp: spool.Spool) -> None:
    """The app as `spoold web --host ADDR` builds it for an address other than loopback (driven in-process:
    the suite binds nothing but 127.0.0.1)."""
    from starlette.testclient import TestClient

    from spoold import web

    token = web.login_token()
    assert web.login_token() == token and (web.token_file().stat().st_mode & 0o777) == 0o600
    with TestClient(web.build_app(sp.root, token=token)) as client:
        assert client.get("/").status_code == 401 and client.get("/metrics").status_code == 401
        assert client.get("/?token=wrong").status_code == 401
        assert client.get(f"/?token={token}").status_code == 200
        assert client.get("/metrics").status_code == 200  # the cookie the page set carries the token on


def test_metrics_speak_prometheus(sp, web) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from spoold import transitions

    api.submit(sp, "fails")
    claimed = transitions.claim(sp, spool.list_queued(sp)[0], "sonnet")
    assert claimed
    transitions.finish(sp, claimed, transitions.result_for(claimed, "failed", "temporary API error: 529 Overloaded"))
    api.submit(sp, "one")
    api.submit(sp, "two")
    text = urllib.request.urlopen(web.url + "/metrics", timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    tasks = {s.labels["state"]: s.value for s in families["spoold_tasks"].samples}
    assert tasks["queued"] == 2 and tasks["done"] == 0
    assert families["spoold_queue_depth"].samples[0].value == 2
    assert families["spoold_held"].samples[0].value == 0
    assert families["spoold_oldest_queued_age_seconds"].samples[0].value >= 0
    assert {s.labels["state"]: s.value for s in families["spoold_finished_24h"].samples} == {"failed": 1}
    [failure] = families["spoold_failures_24h"].samples
    assert failure.value == 1 and failure.labels["reason"].startswith("temporary API error")


def test_search_and_stats_pages(sp: spool.Spool) -> None:
    from starlette.testclient import TestClient

    from spoold import transitions, web
    from spoold.task import Task

    t = Task(id=spool.new_id("sky"), prompt="Why is the sky blue?\n", title="Sky colour")
    transitions.enqueue(sp, t)
    claimed = transitions.claim(sp, spool.list_queued(sp)[0], "sonnet")
    assert claimed
    transitions.finish(sp, claimed, transitions.result_for(claimed, "done", answer="Rayleigh scattering <i>x</i>",
                                                          cost_usd=0.25, duration_s=3.0))
    with TestClient(web.build_app(sp.root)) as client:
        found = client.get("/search", params={"q": "rayleigh"}).text
        assert f'href="/task/{t.id}"' in found and "<b>Rayleigh</b>" in found and "<i>x</i>" not in found
        assert "0 found" in client.get("/search", params={"q": "nothingmatches"}).text
        stats = client.get("/stats").text
        assert "1 finished tasks" in stats and "$0.25" in stats
