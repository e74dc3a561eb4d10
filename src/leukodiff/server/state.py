"""What every request reaches: the station's state (settings, database, stores, queues),
kept on the app by `app.create_app` and read by the routes with `state_of`.

Its own module so the routes need not import `app`: the app is built on the routes,
never the other way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates

from leukodiff.server.adapt_job import ModelJobs
from leukodiff.server.analysis import AnalysisQueue
from leukodiff.server.auth import LoginThrottle
from leukodiff.server.db import Database
from leukodiff.server.settings import Settings
from leukodiff.server.storage import BlobStore, ViewCache

PACKAGE = Path(__file__).parent  # templates/ and static/


@dataclass
class ServerState:
    settings: Settings
    db: Database
    blobs: BlobStore
    views: ViewCache
    queue: AnalysisQueue
    templates: Jinja2Templates
    logins: LoginThrottle
    jobs: ModelJobs


def state_of(request: Request) -> ServerState:
    return request.app.state.leukodiff
