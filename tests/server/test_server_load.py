"""Bounded load over loopback: concurrent uploads and reclassifications lose nothing.

Prints the figures (seconds, requests/s) and writes them to out/test-artifacts/load.txt.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from station_helpers import ARTIFACTS, PASSWORD

UPLOADS = 20
RECLASSIFICATIONS = 50
STALE_WRITERS = 10
TYPES = ["lymphocyte", "monocyte", "neutrophil", "eosinophil", "basophil"]


def signed_in(url: str, username: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    response = client.post("/login", data={"username": username, "password": PASSWORD,
                                           "csrf_token": token})
    assert response.status_code == 303, response.text
    client.headers["X-CSRF-Token"] = client.get("/api/me").json()["csrf"]
    return client


def test_concurrent_uploads_and_reclassifications(database_url, make_live_server, bccd: Path,
                                                  capsys) -> None:
    live = make_live_server(database_url)
    users = [f"tech{i}" for i in range(4)]
    for name in users:
        live.station.add_user(name, "technologist")
    clients = [signed_in(live.url, name) for name in users]
    case = clients[0].post("/api/cases", json={"accession": "LOAD-1"}).json()
    case_url = f"/api/cases/{case['id']}"
    fields = sorted(bccd.glob("BloodImage_*.jpg"))[:UPLOADS]

    def upload(index: int) -> httpx.Response:
        path = fields[index]
        return clients[index % len(clients)].post(
            f"{case_url}/fields", files=[("files", (path.name, path.read_bytes(), "image/jpeg"))])

    with ThreadPoolExecutor(UPLOADS) as pool:
        start = time.perf_counter()
        responses = list(pool.map(upload, range(UPLOADS)))
        upload_seconds = time.perf_counter() - start
    assert [r.status_code for r in responses] == [200] * UPLOADS, [r.text for r in responses]
    field_ids = {r.json()["accepted"][0]["field_id"] for r in responses}
    assert len(field_ids) == UPLOADS

    start = time.perf_counter()
    while True:
        state = clients[0].get(case_url).json()
        if state["progress"]["done"] + state["progress"]["failed"] == UPLOADS:
            break
        assert time.perf_counter() - start < 120, state["progress"]
        time.sleep(0.2)
    analysis_seconds = time.perf_counter() - start
    assert state["progress"]["done"] == UPLOADS and {f["id"] for f in state["fields"]} == field_ids

    # Make sure there are enough cells to edit 50 different ones at once.
    cells = [c for f in state["fields"] for c in f["cells"]]
    field = state["fields"][0]
    for i in range(max(0, RECLASSIFICATIONS + 1 - len(cells))):
        x, y = 8 * (i % 70), 6 * (i // 70)
        added = clients[0].post(f"{case_url}/cells", json={
            "field_id": field["id"], "box": [x, y, x + 40, y + 40], "label": "unidentified"})
        assert added.status_code == 201, added.text
    state = clients[0].get(case_url).json()
    cells = [c for f in state["fields"] for c in f["cells"]]
    targets = cells[:RECLASSIFICATIONS]
    wanted = {c["id"]: TYPES[i % len(TYPES)] for i, c in enumerate(targets)}
    revision = state["revision"]

    def reclassify(index: int) -> httpx.Response:
        cell = targets[index]
        return clients[index % len(clients)].patch(
            f"{case_url}/cells/{cell['id']}",
            json={"label": wanted[cell["id"]], "version": cell["version"]})

    with ThreadPoolExecutor(RECLASSIFICATIONS) as pool:
        start = time.perf_counter()
        responses = list(pool.map(reclassify, range(RECLASSIFICATIONS)))
        edit_seconds = time.perf_counter() - start
    assert [r.status_code for r in responses] == [200] * RECLASSIFICATIONS, \
        [r.text for r in responses if r.status_code != 200]
    state = clients[0].get(case_url).json()
    final = {c["id"]: c["label"] for f in state["fields"] for c in f["cells"]}
    assert all(final[cell_id] == label for cell_id, label in wanted.items())
    assert state["revision"] == revision + RECLASSIFICATIONS  # one audited change each
    audit = clients[0].get(f"{case_url}/audit").json()
    assert sum(e["action"] == "upload" for e in audit) == UPLOADS
    edited = [e for e in audit if e["action"] in ("reclassify", "confirm")]
    assert {e["cell_id"] for e in edited} == set(wanted)

    # Many writers on one cell from the same stale version: one wins, the rest are told.
    victim = next(c for c in cells if c["id"] not in wanted)

    def stale(index: int) -> httpx.Response:
        return clients[index % len(clients)].patch(
            f"{case_url}/cells/{victim['id']}",
            json={"label": TYPES[index % len(TYPES)], "version": victim["version"]})

    with ThreadPoolExecutor(STALE_WRITERS) as pool:
        responses = list(pool.map(stale, range(STALE_WRITERS)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] + [409] * (STALE_WRITERS - 1), codes
    winner = next(r for r in responses if r.status_code == 200).json()["cell"]["label"]
    state = clients[0].get(case_url).json()
    assert {c["id"]: c["label"] for f in state["fields"] for c in f["cells"]}[victim["id"]] \
        == winner

    backend = "postgresql" if database_url else "sqlite"
    report = (f"load ({backend}, loopback, uvicorn 1 process): "
              f"{UPLOADS} concurrent uploads in {upload_seconds:.2f} s "
              f"({UPLOADS / upload_seconds:.1f} requests/s); analysis of {UPLOADS} fields "
              f"{analysis_seconds:.2f} s after the last upload returned; "
              f"{RECLASSIFICATIONS} concurrent reclassifications in {edit_seconds:.2f} s "
              f"({RECLASSIFICATIONS / edit_seconds:.1f} requests/s); "
              f"{STALE_WRITERS} same-version writers: 1 applied, {STALE_WRITERS - 1} refused "
              f"(409); nothing lost")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with (ARTIFACTS / "load.txt").open("a") as handle:
        handle.write(report + "\n")
    with capsys.disabled():
        print(f"\n{report}")
    for client in clients:
        client.close()
