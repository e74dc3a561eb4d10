"""The review station's commands (`serve`, the accounts, `export-training`) on the main
`leukodiff` command. They live in `leukodiff.server.cli`, beside the station; the station's
packages are imported only when one of them runs."""

from __future__ import annotations

import typer

from leukodiff.server.cli import (
    create_user_command,
    deactivate_user_command,
    export_training_command,
    serve,
    set_password_command,
)


def add_server_commands(app: typer.Typer) -> None:
    """Register the station's commands on `app` (listed after the analysis commands)."""
    app.command("serve")(serve)
    app.command("create-user")(create_user_command)
    app.command("set-password")(set_password_command)
    app.command("deactivate-user")(deactivate_user_command)
    app.command("export-training")(export_training_command)
