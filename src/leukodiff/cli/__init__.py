"""The `leukodiff` command. Thin: each command calls library code and prints.

One module per command group: `analyze`, `train`, `evaluate`, `adapt`, `server` (the
review station's commands) and `misc` (`data summary`, `export onnx`, `params`);
`common` holds the console, the error exit and the shared options.
"""

from __future__ import annotations

import typer

from leukodiff.cli.adapt import adapt
from leukodiff.cli.analyze import analyze
from leukodiff.cli.evaluate import evaluate_app
from leukodiff.cli.misc import data_app, export_app, params
from leukodiff.cli.server import add_server_commands
from leukodiff.cli.train import train_app

__all__ = ["app"]

app = typer.Typer(help="White-blood-cell differential counts from blood smear images.",
                  no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(export_app, name="export")
app.command()(analyze)
app.command()(adapt)
app.command()(params)
add_server_commands(app)
