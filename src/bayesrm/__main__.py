"""`python -m bayesrm` runs the CLI."""

from bayesrm.cli import app

app()
