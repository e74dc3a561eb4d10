"""`python -m leukodiff.cli ...`: the `leukodiff` command, every command registered."""

from leukodiff.cli import app

app()
