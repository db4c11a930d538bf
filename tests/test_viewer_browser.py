"""The viewer's page in headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium): records listed, filter by level, click-to-filter, live tail, the request view, and
attacker-controlled log content shown as text. A screenshot is kept in tests/artifacts/."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx
import logsluice
import pytest
from loguru import logger
from viewer_support import TOKEN, XSS_CORPUS, ServerThread, host_app, make_reader, settle

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.timeout(300)
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("chromium and chromedriver are required: scripts/test installs them (ensure_chromium)")
    return browser, driver


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    directory = tmp_path_factory.mktemp("browser-logs")
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(directory, batch_max_delay=0.05))
    handler = pipeline.attach(logger, level="DEBUG")
    reader = make_reader(directory)
    app, view = host_app(pipeline, reader, heartbeat=2.0)
    with ServerThread(app) as server:
        with httpx.Client(base_url=server.base, timeout=30) as c:
            for i in range(5):
                c.get(f"/items/{i}")
            c.get("/items/4040")
        for text in XSS_CORPUS:
            logger.bind(payload=text, link="javascript:alert(7)", site="https://example.org/x").warning(text)
        logger.bind(user={"id": 42}, shop="north").info("user 42 checked out")
        settle(pipeline, reader, 6)
        server.pipeline = pipeline
        yield server
        view.close()
    logger.remove(handler)
    pipeline.close()


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium()
    profile = tempfile.mkdtemp(prefix="logsluice-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=driver_path)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, check, what: str, timeout: float = 20):
    return WebDriverWait(driver, timeout).until(lambda d: check(d), message=what)


def rows(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#rows tr")


def messages(driver) -> list[str]:
    # textContent: exactly the characters shown, U+2028 included.
    return driver.execute_script(
        "return [...document.querySelectorAll('#rows td.message')].map(e => e.textContent)"
    )


def open_page(driver, site, query: str = "") -> None:
    # The token in the address is traded for an HttpOnly cookie and dropped from the URL.
    driver.get(f"{site.base}/logs/?token={TOKEN}")
    wait(driver, lambda d: "token=" not in d.current_url, "the token leaves the address bar")
    if query:
        driver.get(f"{site.base}/logs/?{query}")
    wait(driver, lambda d: len(rows(d)) > 0, "records listed")


def assert_no_injection(driver) -> None:
    try:
        alert = driver.switch_to.alert
        text = alert.text
        alert.dismiss()
        pytest.fail(f"a dialog opened: {text!r}")
    except NoAlertPresentException:
        pass
    injected = driver.execute_script(
        """
        const bad = [];
        const all = (sel) => [...document.querySelectorAll(sel)];
        const show = (e) => e.outerHTML.slice(0, 80);
        for (const e of all('img, iframe, object, embed, script:not([src]), [onerror], [onload]'))
          bad.push(show(e));
        for (const f of all('form')) if (f.id !== 'filters') bad.push(show(f));
        for (const s of all('svg')) if (!s.closest('#histogram')) bad.push(show(s));
        for (const a of document.querySelectorAll('a')) {
          if (!/^https?:/.test(a.href)) bad.push('link ' + a.href);
          else if (a.rel !== 'noopener noreferrer') bad.push('rel ' + a.href);
        }
        return bad;
        """
    )
    assert injected == []


def test_page_lists_records_and_shows_hostile_content_as_text(site, browser):
    open_page(browser, site)
    shown = messages(browser)
    assert "user 42 checked out" in shown
    for text in XSS_CORPUS:
        assert text in shown
    assert_no_injection(browser)
    # Open a hostile record: its fields (javascript: link included) are text too.
    row = next(r for r in rows(browser) if "onerror" in r.text)
    row.find_element(By.CSS_SELECTOR, "td.ts").click()
    wait(browser, lambda d: d.find_element(By.ID, "panel").is_displayed(), "the record panel")
    panel = browser.find_element(By.ID, "panel-body").text
    assert "javascript:alert(7)" in panel and "<img src=x onerror=alert(1)>" in panel
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#panel-body a")]
    assert links == ["https://example.org/x"]
    assert_no_injection(browser)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "viewer-xss.png"))


def test_filter_by_level_and_click_to_filter(site, browser):
    open_page(browser, site)
    Select(browser.find_element(By.NAME, "min_level")).select_by_value("ERROR")
    wait(browser, lambda d: messages(d) == ["item 4040 is missing"], "only the error left")
    assert "min_level=ERROR" in browser.current_url
    # Permalink: the filters live in the URL.
    browser.get(browser.current_url)
    wait(browser, lambda d: messages(d) == ["item 4040 is missing"], "the permalink restores the view")

    open_page(browser, site, "since=1h")
    kind = next(
        e
        for e in browser.find_elements(By.CSS_SELECTOR, "#rows span.v[data-filter=kind]")
        if e.text == "http"
    )
    kind.click()
    wait(browser, lambda d: "kind=http" in d.current_url, "the click added a filter")
    wait(
        browser,
        lambda d: rows(d) and all(r.find_elements(By.CSS_SELECTOR, "td")[2].text == "http" for r in rows(d)),
        "only http records",
    )
    assert len(rows(browser)) >= 6  # the browser's /favicon.ico request is logged too


def test_click_to_filter_on_field_values_that_look_like_numbers(site, browser):
    # A string of digits stays a string and a float a number, so the filter finds its record.
    logger.bind(order_no="1042", price=9.99).info("order checkout-7 paid")
    site.pipeline.flush()
    for field in ("order_no", "price"):
        open_page(browser, site, "text=checkout-7")
        wait(browser, lambda d: messages(d) == ["order checkout-7 paid"], "the record listed")
        rows(browser)[0].find_element(By.CSS_SELECTOR, "td.ts").click()
        wait(browser, lambda d: d.find_element(By.ID, "panel").is_displayed(), "the record panel")
        value = f"//dt[text()='fields.{field}']/following-sibling::dd[1]"
        browser.find_element(By.XPATH, value + "//button[@title='only records with this value']").click()
        wait(browser, lambda d, f=field: f"field.{f}=" in d.current_url, "the click added a field filter")
        wait(browser, lambda d: messages(d) == ["order checkout-7 paid"], "the filter matches its own record")


def test_histogram_coloured_by_level_zooms_on_click(site, browser):
    open_page(browser, site)
    bars = wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#histogram rect.bar-ERROR"), "error bars"
    )
    assert browser.find_elements(By.CSS_SELECTOR, "#histogram rect.bar-INFO")
    bars[0].click()
    wait(browser, lambda d: "until=" in d.current_url and "since=20" in d.current_url, "zoomed to the bar")
    wait(browser, lambda d: "item 4040 is missing" in messages(d), "the bar's records listed")


def test_request_view(site, browser):
    open_page(browser, site, "kind=http&status=404&path=/items/4040")
    rows(browser)[0].find_element(By.CSS_SELECTOR, "td.ts").click()
    button = wait(
        browser, lambda d: d.find_element(By.XPATH, "//button[text()='request view']"), "request view button"
    )
    button.click()
    wait(browser, lambda d: "app records (2)" in d.find_element(By.ID, "panel-body").text, "the request view")
    body = browser.find_element(By.ID, "panel-body").text
    assert "/items/4040" in body and "item 4040 is missing" in body and "looking up item 4040" in body
    assert "view=request" in browser.current_url
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "viewer-request.png"))


def test_live_tail_shows_a_new_record(site, browser):
    open_page(browser, site)
    browser.find_element(By.ID, "live").click()
    wait(browser, lambda d: d.execute_script("return !!document.getElementById('live').checked"), "live on")
    # The stream is open once the server counts a subscriber.
    with httpx.Client(base_url=site.base, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        wait(browser, lambda d: c.get("/logs/api/status").json()["streams"]["subscribers"] >= 1, "subscribed")
    logger.warning("fresh record from the live tail test")
    site.pipeline.flush(timeout=30)
    wait(browser, lambda d: "fresh record from the live tail test" in messages(d), "the new record appears")
    assert messages(browser)[0] == "fresh record from the live tail test"
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "viewer-live.png"))


def test_infinite_scroll_keys_and_paused_live_tail(site, browser):
    for i in range(230):
        logger.bind(batch="scroll").info("scroll record {}", i)
    site.pipeline.flush(timeout=30)
    open_page(browser, site, "field.batch=scroll")
    # The first page is 100 rows; a tall window may already show the end of the table and
    # fetch the next page by itself, so only "at least" holds here.
    assert len(rows(browser)) >= 100

    def scrolled_to(count):
        # Scroll on every poll: a scroll that lands while the previous page is still being
        # appended is (rightly) ignored by the page, and a user would simply scroll again.
        def check(d):
            d.execute_script("window.scrollTo(0, document.body.scrollHeight)")
            return len(rows(d)) >= count

        return check

    wait(browser, scrolled_to(200), "the second page by cursor")
    wait(browser, scrolled_to(230), "the last page")
    wait(browser, lambda d: d.find_element(By.ID, "more").text == "end of results", "the end")
    shown = messages(browser)
    assert len(rows(browser)) == 230
    assert len(set(shown)) == 230 and shown[0] == "scroll record 229" and shown[-1] == "scroll record 0"

    # Keyboard: j moves the selection, Enter opens the record.
    body = browser.find_element(By.TAG_NAME, "body")
    browser.execute_script("window.scrollTo(0, 0)")
    body.send_keys("j")
    body.send_keys("j")
    body.send_keys("\n")
    wait(browser, lambda d: d.find_element(By.ID, "panel").is_displayed(), "Enter opens the record")
    assert "scroll record 228" in browser.find_element(By.ID, "panel-body").text
    body.send_keys("\ue00c")  # Escape
    wait(browser, lambda d: not d.find_element(By.ID, "panel").is_displayed(), "Escape closes it")

    # Live tail while scrolled down: new records wait behind an "N new" button.
    browser.find_element(By.ID, "live").click()
    with httpx.Client(base_url=site.base, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        wait(browser, lambda d: c.get("/logs/api/status").json()["streams"]["subscribers"] >= 1, "subscribed")
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    logger.bind(batch="scroll").info("arrived while scrolled")
    site.pipeline.flush(timeout=30)
    button = browser.find_element(By.ID, "new-records")
    wait(browser, lambda d: button.is_displayed() and button.text == "1 new", "the N new button")
    assert "arrived while scrolled" not in messages(browser)
    button.click()
    wait(browser, lambda d: messages(d)[0] == "arrived while scrolled", "shown on request")
    browser.find_element(By.ID, "live").click()


def test_click_exclude_hides_the_rows_with_that_value(site, browser):
    open_page(browser, site, "kind=http")

    def statuses(d) -> list[str]:
        return [r.find_elements(By.CSS_SELECTOR, "td")[4].text for r in rows(d)]

    wait(browser, lambda d: "404" in statuses(d) and "200" in statuses(d), "200 and 404 listed")
    row = next(r for r in rows(browser) if r.find_elements(By.CSS_SELECTOR, "td")[4].text == "404")
    row.find_element(By.CSS_SELECTOR, "td.ts").click()
    wait(browser, lambda d: d.find_element(By.ID, "panel").is_displayed(), "the record panel")
    browser.find_element(By.CSS_SELECTOR, "#panel-body button.exclude[data-exclude=status]").click()
    wait(browser, lambda d: "exclude.status=404" in d.current_url, "the exclusion is in the address")
    wait(
        browser,
        lambda d: statuses(d) and "404" not in statuses(d) and "200" in statuses(d),
        "the 404 rows are gone, the others stay",
    )
    chip = next(
        c for c in browser.find_elements(By.CSS_SELECTOR, "#chips .chip.exclude") if "status" in c.text
    )
    assert chip.text.startswith("status ≠ 404")
    # Permalink: the exclusion survives a reload.
    browser.get(browser.current_url)
    wait(browser, lambda d: statuses(d) and "404" not in statuses(d), "the permalink keeps the exclusion")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "viewer-exclude.png"))
    # Removing the chip brings them back.
    browser.find_element(By.CSS_SELECTOR, "#chips .chip.exclude").click()
    wait(browser, lambda d: "404" in statuses(d), "the 404 rows are back")
    assert "exclude." not in browser.current_url
