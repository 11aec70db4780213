"""
The lab page in a real browser: Debian's headless chromium, driven by
Selenium through Debian's chromedriver (both installed by `make sysdeps`;
nothing is downloaded at test time).

The page is served by the host daemon and talks to a proxy daemon on
another origin, so the browser does real CORS preflights carrying the
Authorization header; the proxy relays to the host over verified HTTPS.
"""

import os
import shutil
import time
import uuid

import pytest

from tests import token_helpers as th

MiB = 1024**2
SIZE = 64 * MiB
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.slow

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (`make venv` installs it)")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("chromium and chromium-driver are not installed "
                "(`make sysdeps` installs them with apt)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def engine_key():
    # The engine signs with ES256 here (the proxy tests use Ed25519), so the
    # browser's flow covers a second key type. The host (it serves the page
    # on its plain listener) and the proxy are tests/conftest.py's.
    return th.generate("ES256")


@pytest.fixture
def browser(tmp_path):
    # Selenium Manager must never fetch a browser or a driver.
    os.environ["SE_OFFLINE"] = "true"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path / "profile"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,900",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts.add_experimental_option("prefs", {
        "download.default_directory": str(downloads),
        "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {
        "behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def token_for(key, host, hsid, exp_in=600):
    sid = str(uuid.uuid4())
    session = {"url": f"https://localhost:{host.tls_port}/images/{hsid}",
               "size": SIZE, "ops": ["read", "write"], "transfer_id": "browser-test"}
    return sid, th.sign(key, "ES256", th.claims(sid, session, exp_in=exp_in))


def fill(driver, field, value):
    el = driver.find_element(By.ID, field)
    el.clear()
    el.send_keys(value)


def wait_finished(driver, timeout=180):
    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        lambda d: status.get_attribute("data-state") in ("done", "error"))
    return status.get_attribute("data-state"), status.text


def test_upload_and_download_through_proxy_with_token(host, proxy, browser, tmp_path,
                                                      engine_key):
    target = tmp_path / "disk.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    hsid = host.add_session(str(target))
    sid, token = token_for(engine_key, host, hsid)
    source = tmp_path / "upload.raw"
    data = os.urandom(SIZE)
    source.write_bytes(data)

    browser.get(f"http://127.0.0.1:{host.tcp_port}/ui/")
    assert "imaged lab" in browser.title
    fill(browser, "url", f"http://127.0.0.1:{proxy.tcp_port}/images/{sid}")
    fill(browser, "token", token)
    browser.find_element(By.ID, "file").send_keys(str(source))
    browser.find_element(By.ID, "upload").click()
    state, text = wait_finished(browser)
    browser.save_screenshot(str(tmp_path / "upload-finished.png"))
    assert state == "done", browser.find_element(By.ID, "error").text
    assert f"Upload complete: {SIZE} bytes" in text
    assert float(browser.find_element(By.ID, "progress").get_attribute("value")) == SIZE
    # The bytes are on the host's disk.
    assert target.read_bytes() == data
    assert os.path.getsize(tmp_path / "upload-finished.png") > 1000

    # Download it back: fetch() with the token, saved by the browser.
    browser.find_element(By.ID, "download").click()
    state, text = wait_finished(browser)
    assert state == "done", browser.find_element(By.ID, "error").text
    saved = browser.downloads / f"{sid}.raw"
    deadline = time.monotonic() + 60
    while not (saved.exists() and saved.stat().st_size == SIZE) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert saved.read_bytes() == data

    # The token never reached the logs of either daemon.
    assert token not in proxy.log() and token not in host.log()


def test_expired_token_shows_the_error(host, proxy, browser, tmp_path, engine_key):
    target = tmp_path / "disk.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    hsid = host.add_session(str(target))
    sid, token = token_for(engine_key, host, hsid, exp_in=-10)
    source = tmp_path / "small.raw"
    source.write_bytes(b"\x01" * MiB)
    browser.get(f"http://127.0.0.1:{host.tcp_port}/ui/")
    fill(browser, "url", f"http://127.0.0.1:{proxy.tcp_port}/images/{sid}")
    fill(browser, "token", token)
    browser.find_element(By.ID, "file").send_keys(str(source))
    browser.find_element(By.ID, "upload").click()
    state, _ = wait_finished(browser)
    assert state == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert "403" in error.text and "token expired" in error.text
    browser.save_screenshot(str(tmp_path / "expired-token.png"))
    # Nothing was written.
    assert target.read_bytes() == bytes(SIZE)
    # Download with the same token: the same clear error.
    browser.find_element(By.ID, "download").click()
    state, _ = wait_finished(browser)
    assert state == "error"
    assert "Download failed: 403" in browser.find_element(By.ID, "error").text


def test_upload_straight_to_host_by_session_id(host, browser, tmp_path):
    # No proxy, no token: a session id on the page's own server.
    target = tmp_path / "disk.raw"
    size = 5 * MiB + 4096
    with open(target, "wb") as f:
        f.truncate(size)
    hsid = host.add_session(str(target))
    data = os.urandom(size)
    source = tmp_path / "direct.raw"
    source.write_bytes(data)
    browser.get(f"http://127.0.0.1:{host.tcp_port}/ui/#{hsid}")
    assert browser.find_element(By.ID, "url").get_attribute("value") == hsid
    fill(browser, "chunk", "2")
    browser.find_element(By.ID, "file").send_keys(str(source))
    browser.find_element(By.ID, "upload").click()
    state, text = wait_finished(browser)
    assert state == "done", browser.find_element(By.ID, "error").text
    assert target.read_bytes() == data
