"""The review page in a real browser: Debian's Chromium driven by Playwright, over loopback.

Saves a screenshot of the cell gallery to out/test-artifacts/ (a CI artifact).
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from station_helpers import ARTIFACTS, FIELDS, PASSWORD

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the browser test needs the playwright package")
expect = sync_api.expect
TYPES = ["lymphocyte", "monocyte", "neutrophil", "eosinophil", "basophil"]


@pytest.fixture
def browser_page(tmp_path: Path):
    if not CHROMIUM.exists():
        pytest.skip(f"the browser test needs Debian's Chromium at {CHROMIUM} "
                    "(apt-get install chromium, or run .ci/services.sh)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=FLAGS, accept_downloads=True, viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(30_000)
        page = context.pages[0] if context.pages else context.new_page()
        yield page
        context.close()


def drop_files(page, selector: str, *paths: Path) -> None:
    """Drop files on an element as a user dragging them from the desktop would."""
    files = [[p.name, base64.b64encode(p.read_bytes()).decode()] for p in paths]
    transfer = page.evaluate_handle(
        """files => {
            const transfer = new DataTransfer();
            for (const [name, data] of files) {
                const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
            }
            return transfer;
        }""", files)
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def count_cell(page, label: str):
    return page.locator(f"#differential tr[data-label='{label}'] td.count")


def count_of(page, label: str) -> int:
    return int(count_cell(page, label).inner_text())


def sign_in(page, url: str, username: str) -> None:
    page.goto(f"{url}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")


def shown(page) -> list[int]:
    """The gallery's cell ids, in the order on screen."""
    return [int(i) for i in page.locator("#gallery .thumb").evaluate_all(
        "nodes => nodes.map(n => n.dataset.cell)")]


def selected(page):
    return page.locator("#gallery .thumb.selected")


def selected_id(page) -> int:
    return int(selected(page).get_attribute("data-cell"))


def test_review_in_the_browser(live_server, browser_page, bccd: Path, tmp_path: Path) -> None:
    page = browser_page
    live_server.station.add_user("rita", "reviewer")

    page.goto(f"{live_server.url}/login")
    page.fill("input[name=username]", "rita")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")

    page.fill("input[name=accession]", "BROWSER-1")
    page.click("#new-case button[type=submit]")
    page.wait_for_url("**/cases/*")
    assert page.locator("#accession").inner_text() == "BROWSER-1"

    # One field through the file chooser, one dropped on the drop zone.
    page.set_input_files("#file-input", str(bccd / FIELDS[0]))
    expect(page.locator("#progress-text")).to_contain_text("of 1 field")
    drop_files(page, "#dropzone", bccd / FIELDS[1])
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Analysed 2 of 2 field\(s\)$"),
                                                        timeout=60_000)
    page.wait_for_selector("#gallery .thumb")
    page.wait_for_selector(".stage img")

    # Reclassify the first cell with a keyboard shortcut; the table's count follows.
    first = page.locator("#gallery .thumb").first
    old_label = first.locator("xpath=ancestor::div[@class='gallery-section']").get_attribute(
        "data-label")
    new_label = next(t for t in TYPES if t != old_label)
    before = count_of(page, new_label)
    first.click()
    page.keyboard.press(str(TYPES.index(new_label) + 1))
    expect(count_cell(page, new_label)).to_have_text(str(before + 1))
    assert count_of(page, new_label) == before + 1

    # A class the models never predict, by its key from the served taxonomy (blast: 8);
    # its colour reaches the page as a CSS custom property set from the same taxonomy.
    taxonomy = json.loads(page.locator("#taxonomy").text_content())
    blast = next(c for c in taxonomy["classes"] if c["name"] == "blast")
    page.locator("#gallery .thumb").first.click()
    page.keyboard.press(blast["key"])
    expect(count_cell(page, "blast")).to_have_text("1")
    expect(page.locator(".gallery-section[data-label='blast'] .thumb")).to_have_count(1)
    assert page.evaluate("getComputedStyle(document.documentElement)"
                         ".getPropertyValue('--blast').trim()") == blast["colour"]

    # Classify whatever is still unidentified (neutrophil, key 3) so the case can be signed.
    while page.locator(".gallery-section[data-label='unidentified'] .thumb").count():
        remaining = count_of(page, "unidentified")
        page.locator(".gallery-section[data-label='unidentified'] .thumb").first.click()
        page.keyboard.press("3")
        expect(count_cell(page, "unidentified")).to_have_text(str(remaining - 1))

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#gallery").screenshot(path=str(ARTIFACTS / "review-gallery.png"))
    page.screenshot(path=str(ARTIFACTS / "review-page.png"), full_page=True)

    # Sign-off asks for confirmation: counted vs target, unreviewed, failed; a reason is
    # required below the target (issue #16).
    page.click("#sign-off")
    expect(page.locator("#sign-off-confirm")).to_be_visible()
    expect(page.locator("#confirm-target")).to_have_text("100")
    expect(page.locator("#sign-off-problems")).to_contain_text("of 100 target cells")
    page.fill("#sign-off-reason", "browser test sample")
    page.click("#sign-off-confirm-button")
    expect(page.locator("#status")).to_have_text("signed")
    expect(page.locator("#signed-reason-text")).to_have_text("browser test sample")
    with page.expect_download() as download_info:
        page.click("#export-fhir")
    saved = tmp_path / "report.fhir.json"
    download_info.value.save_as(saved)
    bundle = json.loads(saved.read_text())
    report = bundle["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport"
    assert report["identifier"][0]["value"] == "BROWSER-1"
    assert len(report["result"]) == 6  # the five types and the blast seen
    shutil.copy(saved, ARTIFACTS / "BROWSER-1.fhir.json")

    # Amend: a reviewer reopens the signed case with a reason; its edit controls come back.
    page.click("#reopen")
    page.fill("#reopen-reason", "wrong cell type")
    page.click("#reopen-confirm-button")
    expect(page.locator("#status")).to_have_text("open")
    expect(page.locator("#amended")).to_contain_text("reopened because: wrong cell type")
    expect(page.locator("#sign-off")).to_be_visible()
    expect(page.locator("#target-form")).to_be_visible()


def test_gallery_least_confident_first_and_the_keys_follow_it(live_server, browser_page,
                                                              bccd: Path) -> None:
    """Issue #15: the gallery ordered by the model's confidence, least confident first,
    remembered by the browser; J / K and the step after a label follow the order shown."""
    page = browser_page
    live_server.station.add_user("tess", "technologist")
    sign_in(page, live_server.url, "tess")
    page.fill("input[name=accession]", "ORDER-1")
    page.click("#new-case button[type=submit]")
    page.wait_for_url("**/cases/*")
    case_id = page.url.rsplit("/", 1)[1]
    # Uploaded so that (with today's models) neither order shown is the cells' ids.
    page.set_input_files("#file-input", [str(bccd / FIELDS[i]) for i in (1, 2, 0)])
    expect(page.locator("#progress-text")).to_have_text(
        re.compile(r"^Analysed 3 of 3 field\(s\)$"), timeout=60_000)
    case = page.request.get(f"{live_server.url}/api/cases/{case_id}").json()
    cells = {c["id"]: c for field in case["fields"] for c in field["cells"]}
    assert len(cells) >= 3, "the Analyzer found too few white cells in three BCCD fields"
    expect(page.locator("#gallery .thumb")).to_have_count(len(cells))

    # Each crop shows the model's confidence in its type.
    for cell_id, cell in cells.items():
        text = page.locator(f'#gallery .thumb[data-cell="{cell_id}"] .confidence').inner_text()
        confidence = cell["model_confidence"]
        rounded = min(math.floor(100 * confidence + 0.5), 99 if confidence < 1 else 100)
        assert text == f"{rounded}%"

    # By type (the default): J walks the groups as shown, K goes back.
    assert page.input_value("#gallery-order") == "type"
    by_type = shown(page)
    walked = []
    for _ in by_type:
        page.keyboard.press("j")
        walked.append(selected_id(page))
    assert walked == by_type
    page.keyboard.press("k")
    assert selected_id(page) == by_type[-2]

    # Least confident first; J / K follow it.
    page.select_option("#gallery-order", "confidence")
    least_first = sorted(cells, key=lambda i: (cells[i]["model_confidence"], i))
    assert shown(page) == least_first
    page.locator(f'#gallery .thumb[data-cell="{least_first[0]}"]').click()
    page.keyboard.press("j")
    assert selected_id(page) == least_first[1]
    page.keyboard.press("k")
    assert selected_id(page) == least_first[0]
    # A label set moves on to the next cell as shown; the order stays (it is the model's).
    page.keyboard.press("2")
    expect(selected(page)).to_have_attribute("data-cell", str(least_first[1]))
    assert shown(page) == least_first
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#gallery").screenshot(path=str(ARTIFACTS / "review-gallery-confidence.png"))

    # Remembered by this browser.
    page.reload()
    expect(page.locator("#gallery .thumb")).to_have_count(len(cells))
    assert page.input_value("#gallery-order") == "confidence"
    assert shown(page) == least_first

    # Back by type: a new label moves the cell to another group, yet the next cell
    # selected is the one after it where the reviewer was looking.
    page.select_option("#gallery-order", "type")
    by_type = shown(page)
    first = page.locator(f'#gallery .thumb[data-cell="{by_type[0]}"]')
    label = first.locator("xpath=ancestor::div[@class='gallery-section']").get_attribute(
        "data-label")
    new_label = next(t for t in TYPES if t != label)
    first.click()
    page.keyboard.press(str(TYPES.index(new_label) + 1))
    expect(selected(page)).to_have_attribute("data-cell", str(by_type[1]))
    expect(page.locator(f'.gallery-section[data-label="{new_label}"] '
                        f'.thumb[data-cell="{by_type[0]}"]')).to_have_count(1)


def test_exclude_and_include_a_field_in_the_browser(live_server, browser_page, bccd: Path
                                                    ) -> None:
    """Issue #16 item 4 on the page: *Exclude field...* asks for a reason; the field greys,
    its cells move to a frozen gallery group and leave the tally; *Include again* undoes it;
    the sign-off confirmation lists the excluded field."""
    page = browser_page
    station = live_server.station
    station.add_user("rita", "reviewer")
    client = station.client("tess")
    case = client.post("/api/cases", json={"accession": "BROWSER-X"}).json()
    files = [("files", (n, (bccd / n).read_bytes(), "image/jpeg")) for n in FIELDS[:2]]
    assert client.post(f"/api/cases/{case['id']}/fields", files=files).status_code == 200
    sign_in(page, live_server.url, "rita")
    page.goto(f"{live_server.url}/cases/{case['id']}")
    expect(page.locator("#progress-text")).to_have_text(
        re.compile(r"^Analysed 2 of 2 field\(s\)$"), timeout=60_000)
    page.wait_for_selector("#gallery .thumb")
    tally = page.locator("#tally").inner_text()
    before = int(re.search(r"Counted (\d+)", tally).group(1))
    second = page.locator("figure.field").nth(1)
    in_second = second.locator(".box").count()

    second.locator("button.exclude-field").click()
    second.locator(".exclude-form input").fill("   ")  # blank: refused before the API
    second.locator(".exclude-form button[type=submit]").click()
    expect(page.locator("#message")).to_have_text("A reason is required to exclude a field.")
    second.locator(".exclude-form input").fill("Blurred.")
    second.locator(".exclude-form button[type=submit]").click()
    expect(page.locator("figure.field.excluded")).to_have_count(1)
    expect(page.locator(".excluded-note")).to_contain_text("Excluded by rita: Blurred.")
    expect(page.locator("#progress-text")).to_contain_text("1 excluded")
    expect(page.locator(".gallery-section.excluded .thumb")).to_have_count(in_second)
    counted = int(re.search(r"Counted (\d+)", page.locator("#tally").inner_text()).group(1))
    assert counted < before

    page.click("#sign-off")
    expect(page.locator("#confirm-excluded")).to_have_text("1")
    expect(page.locator("#confirm-fields")).to_contain_text(f"{FIELDS[1]}: excluded by rita "
                                                            "(Blurred.)")
    page.click("#sign-off-cancel")

    page.locator("figure.field.excluded button.include-field").click()
    expect(page.locator("figure.field.excluded")).to_have_count(0)
    expect(page.locator("#tally")).to_contain_text(f"Counted {before} ")
