"""The server's commands: create-user (the first admin), deactivate-user and serve, as the
CLI wires them."""

from __future__ import annotations

from pathlib import Path

import typer
from sqlalchemy import select
from typer.testing import CliRunner

from leukodiff.server import Settings, create_app
from leukodiff.server.auth import authenticate
from leukodiff.server.cli import (
    create_user_command,
    deactivate_user_command,
    serve,
    set_password_command,
)
from leukodiff.server.db import AuditEvent


def commands() -> typer.Typer:
    app = typer.Typer()
    app.command("serve")(serve)
    app.command("create-user")(create_user_command)
    app.command("deactivate-user")(deactivate_user_command)
    app.command("set-password")(set_password_command)
    return app


def test_create_user_then_log_in(tmp_path: Path) -> None:
    data = tmp_path / "data"
    runner = CliRunner()
    result = runner.invoke(commands(), ["create-user", "ada", "--role", "admin", "--data-dir",
                                        str(data), "--password-stdin"],
                           input="a long admin password\n")
    assert result.exit_code == 0, result.output
    assert "created admin 'ada'" in result.output
    again = runner.invoke(commands(), ["create-user", "ada", "--data-dir", str(data),
                                       "--password-stdin"], input="a long admin password\n")
    assert again.exit_code == 1 and "already exists" in again.output
    weak = runner.invoke(commands(), ["create-user", "bob", "--data-dir", str(data),
                                      "--password-stdin"], input="short\n")
    assert weak.exit_code == 1 and "at least 8" in weak.output
    bad_role = runner.invoke(commands(), ["create-user", "cy", "--role", "boss", "--data-dir",
                                          str(data), "--password-stdin"], input="long enough\n")
    assert bad_role.exit_code == 1 and "role must be one of" in bad_role.output

    app = create_app(Settings(data_dir=data))
    with app.state.leukodiff.db.reading() as session:
        assert authenticate(session, "ada", "a long admin password").role == "admin"
        assert authenticate(session, "ada", "wrong") is None
    app.state.leukodiff.db.dispose()

    locked = runner.invoke(commands(), ["deactivate-user", "ada", "--data-dir", str(data)])
    assert locked.exit_code == 0 and "deactivated" in locked.output
    unknown = runner.invoke(commands(), ["deactivate-user", "zed", "--data-dir", str(data)])
    assert unknown.exit_code == 1 and "no user 'zed'" in unknown.output
    with app.state.leukodiff.db.reading() as session:
        assert authenticate(session, "ada", "a long admin password") is None
    back = runner.invoke(commands(), ["deactivate-user", "ada", "--reactivate",
                                      "--data-dir", str(data)])
    assert back.exit_code == 0 and "'ada' is active" in back.output
    with app.state.leukodiff.db.reading() as session:
        assert authenticate(session, "ada", "a long admin password").role == "admin"
        actions = [e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert actions == ["create_user", "deactivate_user", "activate_user"]

    reset = runner.invoke(commands(), ["set-password", "ada", "--data-dir", str(data),
                                       "--password-stdin"], input="the admin forgot it\n")
    assert reset.exit_code == 0 and "new password set for 'ada'" in reset.output
    short = runner.invoke(commands(), ["set-password", "ada", "--data-dir", str(data),
                                       "--password-stdin"], input="short\n")
    assert short.exit_code == 1 and "at least 8" in short.output
    with app.state.leukodiff.db.reading() as session:
        assert authenticate(session, "ada", "the admin forgot it").role == "admin"
    app.state.leukodiff.db.dispose()


def test_bad_database_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(commands(), [
        "create-user", "ada", "--data-dir", str(tmp_path),
        "--database-url", "postgresql+psycopg://nobody:x@127.0.0.1:1/none", "--password-stdin"],
        input="a long admin password\n")
    assert result.exit_code == 1 and "error:" in result.output
    assert "Traceback" not in result.output


def test_serve_help_lists_its_options() -> None:
    result = CliRunner().invoke(commands(), ["serve", "--help"])
    assert result.exit_code == 0 and "--data-dir" in result.output
    serve_command = typer.main.get_command(commands()).get_command(None, "serve")
    options = {option for param in serve_command.params for option in param.opts}
    assert options >= {"--data-dir", "--database-url", "--host", "--port", "--max-upload-mb",
                       "--max-image-mp", "--forwarded-allow-ips", "--max-files",
                       "--session-hours", "--login-max-failures", "--login-window-minutes",
                       "--data-root"}
