"""Helpers shared by the server tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from fastapi.testclient import TestClient

PASSWORD = "correct horse battery"
# BCCD test-list fields (never used for training); each holds at least one white cell.
FIELDS = ["BloodImage_00007.jpg", "BloodImage_00011.jpg", "BloodImage_00015.jpg"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "out" / "test-artifacts"


def login(client: TestClient, username: str, password: str = PASSWORD) -> TestClient:
    """Sign a client in through the form (CSRF included) and arm it with the API token."""
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    response = client.post("/login", data={"username": username, "password": password,
                                           "csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303, response.text
    client.headers["X-CSRF-Token"] = client.get("/api/me").json()["csrf"]
    return client


def upload(client: TestClient, case_id: int, *paths: Path):
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return client.post(f"/api/cases/{case_id}/fields", files=files)


def wait_analysed(client: TestClient, case_id: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        case = client.get(f"/api/cases/{case_id}").json()
        if case["progress"]["queued"] + case["progress"]["analysing"] == 0:
            return case
        time.sleep(0.1)
    raise AssertionError(f"case {case_id} still analysing after {timeout} s")


def all_cells(case: dict) -> list[dict]:
    return [cell for field in case["fields"] for cell in field["cells"]]


def new_case(client: TestClient, accession: str = "S-2026-0001", target: int = 100) -> dict:
    """A new case through the API (201 asserted)."""
    response = client.post("/api/cases", json={"accession": accession, "target_count": target})
    assert response.status_code == 201, response.text
    return response.json()


def name_unidentified(client: TestClient, case: dict) -> dict:
    """Classify every unidentified cell (sign-off needs each cell named); the case after."""
    for cell in all_cells(case):
        if cell["label"] == "unidentified":
            assert client.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                                json={"label": "neutrophil", "version": cell["version"]}
                                ).is_success
    return client.get(f"/api/cases/{case['id']}").json()
