"""What every command module of the `leukodiff` command shares: the console, the error
exit, the progress bar and the common options."""

from __future__ import annotations

import importlib.util
import sys

import typer
from rich.console import Console
from rich.markup import escape


def _require_torch() -> None:
    """Training, evaluation and export need the [torch] extra; analysis alone does not."""
    if "--help" in sys.argv:  # help needs no torch
        return
    for module in ("torch", "torchvision"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            Console().print("[bold red]error:[/] this command needs PyTorch: pip install "
                            "'leukodiff\\[torch]' (analyze alone runs on onnxruntime)",
                            highlight=False)
            raise typer.Exit(code=1)


console = Console()
SHORT_NAMES = {"lymphocyte": "Lym", "monocyte": "Mono", "neutrophil": "Neut",
               "eosinophil": "Eos", "basophil": "Baso"}


DataRoot = typer.Option(
    None, "--data-root", help="Folder holding bccd/, kbc/, pbc/, bcd/ "
    "[default: $LEUKODIFF_DATA, else ../shared/data beside the checkout]."
)


WeightsDir = typer.Option(
    None, "--weights-dir", help="ImageNet TFLite weights folder "
    "[default: $LEUKODIFF_WEIGHTS, else ../shared/weights]."
)


def _track(items, description: str = ""):
    """Progress bar for long library loops (library code itself never prints)."""
    from rich.progress import track

    if not console.is_terminal:  # logs and CI: no bar redraws
        return items
    return track(items, description=description, console=console, transient=True)


def _fail(message: str) -> typer.Exit:
    console.print("[bold red]error:[/]", escape(message), highlight=False)
    return typer.Exit(code=1)


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _command() -> str:
    return "leukodiff " + " ".join(sys.argv[1:])

