"""Drives the collector's console in headless Chromium through WebDriver (Selenium).

Run by collector/tests/console_browser.rs:
    console.py BASE_URL WRITE_TOKEN FINDING_ID [SCREENSHOT_DIR]

Logs in with the write token, then checks each page: no browser console error, the chart's
band contains every plotted point (the browser's own SVG geometry decides), the thresholds
and runs are drawn, the overview writes 144 GPU-seconds as 0.040 GPU-hours, and the
finding's lifecycle forms move it (acknowledged, then filed with a reference). Prints
"console ok" at the end; any failed check raises.
"""

import os
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

base, token, finding_id = sys.argv[1], sys.argv[2], sys.argv[3]
shots = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None

options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
            "--disable-gpu", "--hide-scrollbars"):
    options.add_argument(arg)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
driver.set_page_load_timeout(30)
# The viewport itself 1280x900 (a window of that size leaves less to the page).
driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                       {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})


def visit(path, title_part, shot=None):
    driver.get(base + path)
    check_page(title_part, shot)


def submit(button_id):
    """Clicks a form's button and waits until the browser has left the page (a click does
    not wait for the navigation it starts)."""
    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, button_id).click()
    WebDriverWait(driver, 20).until(expected_conditions.staleness_of(old))
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")


def check_page(title_part, shot=None):
    assert title_part in driver.title, f"{driver.current_url}: title {driver.title!r}"
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"{driver.current_url}: console errors {errors}"
    if shots and shot:
        driver.save_screenshot(os.path.join(shots, shot))
    print("ok", driver.current_url, flush=True)


try:
    # Not logged in: the console sends the browser to the login form.
    visit("/", "Log in")
    driver.find_element(By.ID, "token").send_keys(token)
    submit("login")
    check_page("Overview", "console-overview.png")
    tenants = driver.find_element(By.ID, "tenants").text
    row_d = [line for line in tenants.splitlines() if line.startswith("d ")]
    assert row_d and " 0.040 " in row_d[0], f"tenant d's GPU-hours: {row_d}"
    assert "acting as alice" in driver.find_element(By.TAG_NAME, "header").text

    visit("/console/tenants/f", "Tenant f", "console-tenant.png")
    band = driver.find_element(By.CSS_SELECTOR, "#ops-chart polygon.band")
    points = driver.find_elements(By.CSS_SELECTOR, "#ops-chart circle.point")
    assert len(points) >= 3, f"{len(points)} points"
    for p in points:
        cx, cy = float(p.get_attribute("cx")), float(p.get_attribute("cy"))
        inside = driver.execute_script(
            "const pt = arguments[0].ownerSVGElement.createSVGPoint(); pt.x = arguments[1]; pt.y = arguments[2];"
            "return arguments[0].isPointInFill(pt) || arguments[0].isPointInStroke(pt);",
            band, cx, cy)
        assert inside, f"point ({cx}, {cy}) outside the band {band.get_attribute('points')}"
    # The check can fail: a point far above the upper bound is outside.
    assert not driver.execute_script(
        "const pt = arguments[0].ownerSVGElement.createSVGPoint(); pt.x = arguments[1]; pt.y = 1;"
        "return arguments[0].isPointInFill(pt);", band, float(points[-1].get_attribute("cx")))
    thresholds = driver.find_elements(By.CSS_SELECTOR, "#ops-chart line.threshold")
    assert len(thresholds) == 3, f"{len(thresholds)} threshold lines"
    runs = driver.find_elements(By.CSS_SELECTOR, "#ops-chart rect.run")
    assert len(runs) == 3, f"{len(runs)} runs"
    assert "h1" in driver.find_element(By.ID, "hosts").text and "h2" in driver.find_element(By.ID, "hosts").text
    methods = driver.find_element(By.ID, "methods").text
    assert "gpm_tensor" in methods and "gpm_pipes" in methods, methods

    visit("/console/hosts", "Hosts", "console-hosts.png")
    table = driver.find_element(By.ID, "host-table").text
    assert "timeout" in table, table
    assert "enforcement_mismatch" in table or "prohibits" in table, table

    visit(f"/console/findings/{finding_id}", f"Finding #{finding_id}")
    assert driver.find_element(By.ID, "finding-state").text == "open"
    submit("acknowledge-button")
    check_page(f"Finding #{finding_id}", "console-finding.png")
    assert driver.find_element(By.ID, "finding-state").text == "acknowledged"
    driver.find_element(By.ID, "file-reference").send_keys("BIS-2026-0042")
    submit("file-button")
    check_page(f"Finding #{finding_id}")
    assert driver.find_element(By.ID, "finding-state").text == "filed"
    assert driver.find_element(By.ID, "filed-reference").text == "BIS-2026-0042"
    audit = driver.find_element(By.ID, "audit").text
    assert "finding_acknowledged" in audit and "finding_filed" in audit and "BIS-2026-0042" in audit, audit

    visit(f"/console/findings/{finding_id}/record", "")
    visit("/", "Overview")
    submit("logout")
    check_page("Log in")
    print("console ok", flush=True)
finally:
    driver.quit()
