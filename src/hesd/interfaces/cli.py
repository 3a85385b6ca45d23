"""The ``hesd`` command line."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Hessian eigenvalue spectral density (HESD) tools.")


@app.callback()
def _root() -> None:
    """Hessian eigenvalue spectral density (HESD) tools."""


@app.command()
def demo() -> None:
    """Train a small network on the bundled digits data and print its HESD summary."""
    from .demo import run_demo

    run_demo()


def main() -> None:
    app()
