"""The review station: a FastAPI server where technologists verify and sign off differentials.

    from leukodiff.server import Settings, create_app
    app = create_app(Settings(data_dir="lab-data"))
"""

from leukodiff.server.app import create_app
from leukodiff.server.settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError", "create_app"]
