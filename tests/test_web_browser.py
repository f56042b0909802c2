"""The web application in a real browser (Debian's Chromium driven by Playwright; nothing
downloaded): an auditor logs in, searches, opens the analysed study, sees the preview
and the measurements, and is refused a resend; an admin resends a failed delivery,
which then reaches the PACS. The study page's screenshot goes to docs/study-page.png."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from analysis.phantoms.dicom_series import write_ct_series
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from tests.conftest import missing_peer, query, require_tool
from tests.orthanc import Orthanc, free_ports
from tests.test_return_to_pacs import analysing_node, wait_until
from tests.web_helpers import PASSWORD, add_user

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "study-page.png"
SPEC = PhantomSpec(slices=24, rows=128, columns=128, pixel_spacing_mm=3.0, seed=11)


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        missing_peer("no /usr/bin/chromium (make test installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_peer("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox"])
        yield browser
        browser.close()


def _login(page: Any, url: str, name: str) -> None:
    page.goto(f"{url}/studies")
    assert "/login" in page.url  # no session: the login form, then back here
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/studies")


def test_audit_a_study_in_the_browser(make_node: Any, browser: Any, tmp_path: Path) -> None:
    require_tool("storescu", "Orthanc")
    http_port, dicom_port = free_ports(2)
    # The PACS is down at first: the delivery fails for good (one attempt), to be resent.
    node = analysing_node(make_node, ("pacs", dicom_port),
                          PACSNODE__DELIVERY__MAX_AGE_H="0.0005")
    add_user(node, "otto", "auditor")
    add_user(node, "ada", "admin")
    ct = write_ct_series(make_phantom(SPEC), tmp_path / "ct", patient_id="QA-0042",
                         patient_name="Browser^Test")
    node.storescu(*ct.paths)
    study = ct.study_instance_uid
    wait_until(lambda: query(node.db_url, "SELECT id FROM deliveries WHERE status = 'failed'"),
               180, f"the analysis and the failed deliveries\n{node.log()[-2000:]}")
    pacs = Orthanc.start(tmp_path / "orthanc", ports=(http_port, dicom_port))
    try:
        _auditor_reads(browser, node.web_url, study)
        _admin_resends(browser, node, study)
        wait_until(lambda: pacs.modalities_of_study(study).get("SEG") == 1, 60,
                   "the resent SEG in the PACS")
    finally:
        pacs.stop()
    log = query(node.db_url, "SELECT username, action, outcome FROM access_log ORDER BY id")
    assert {"username": "otto", "action": "denied", "outcome": "refused"} in log
    assert {"username": "ada", "action": "resend", "outcome": "ok"} in log
    assert {"username": "otto", "action": "view_study", "outcome": "ok"} in log


def _auditor_reads(browser: Any, url: str, study: str) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    _login(page, url, "otto")
    page.fill("input[name=patient_id]", "QA-0042")
    page.click("form.filters button")
    page.wait_for_url("**patient_id=QA-0042**")
    assert page.locator("table.studies tbody tr").count() == 1
    page.click("table.studies tbody a")
    page.wait_for_url(f"{url}/studies/{study}")
    preview = page.locator("img.preview")
    assert preview.count() == 1
    assert page.evaluate("img => img.complete && img.naturalWidth > 100",
                         preview.element_handle())
    rows = page.locator("table.measurements tbody tr")
    labels = [rows.nth(i).locator("td").first.inner_text() for i in range(rows.count())]
    assert {"Body", "Left lung", "Right lung"} <= set(labels), labels
    volume = float(rows.nth(labels.index("Left lung")).locator("td").nth(1).inner_text())
    assert 100 < volume < 10000  # mL, a plausible lung
    assert page.locator("text=Predicted region").count() >= 1
    assert page.locator("button:has-text('Resend')").count() == 0  # not for an auditor
    # Forcing it anyway (with the session's own CSRF token) is refused, and logged.
    status = page.evaluate("""async () => {
        const token = document.querySelector('input[name=csrf_token]').value;
        const id = %d;
        const r = await fetch('/api/deliveries/' + id + '/resend',
                              {method: 'POST', headers: {'X-CSRF-Token': token}});
        return r.status; }""" % 1)
    assert status == 403
    page.close()


def _admin_resends(browser: Any, node: Any, study: str) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    _login(page, node.web_url, "ada")
    page.goto(f"{node.web_url}/studies/{study}")
    page.wait_for_load_state("networkidle")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(tmp := SCREENSHOT.with_suffix(".new.png")), full_page=True)
    shutil.move(tmp, SCREENSHOT)
    seg = page.locator(".result-seg table.deliveries button:has-text('Resend')")
    assert seg.count() == 1
    seg.click()
    page.wait_for_url(f"**/studies/{study}?note=*")
    assert "will be sent again" in page.locator(".note").inner_text()
    wait_until(lambda: query(node.db_url, "SELECT d.id FROM deliveries d JOIN results r "
                             "ON r.id = d.result_fk WHERE r.kind = 'seg' AND "
                             "d.status = 'sent'"), 60, "the resent SEG delivered")
    page.reload()
    assert page.locator(".result-seg table.deliveries td.status-sent").count() == 1
    page.close()
