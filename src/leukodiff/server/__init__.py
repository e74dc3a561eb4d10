"""The review station: a FastAPI server where technologists verify and sign off differentials.

    from leukodiff.server import Settings, create_app
    app = create_app(Settings(data_dir="lab-data"))

The names are imported on first use (PEP 562), so `leukodiff.server.cli`, which the
main command imports, works in an install without the [server] extra.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {"create_app": "leukodiff.server.app", "Settings": "leukodiff.server.settings",
          "SettingsError": "leukodiff.server.settings"}

__all__ = ["Settings", "SettingsError", "create_app"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
