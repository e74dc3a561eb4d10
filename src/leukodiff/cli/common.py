"""What every command module of the `leukodiff` command shares: the console, the error
exit, the progress bar and the common options."""

from __future__ import annotations

import importlib.util
import sys
from typing import Annotated, Any

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


# Options that several commands take, with one meaning: written once (Annotated aliases;
# each command gives its default).
Resume = Annotated[bool, typer.Option(help="Continue the run interrupted in --out (a crash, "
                                      "Ctrl-C, a time limit) from its last epoch.")]
TimeLimit = Annotated[float, typer.Option(help="Stop cleanly after the epoch that passes this "
                                          "many minutes (0: no limit); --resume goes on.")]
Backend = Annotated[str, typer.Option(help="Where the networks run: onnx (onnxruntime), "
                                      "torch, or auto (onnx when the exported ONNX files "
                                      "are there).")]
DetectorModel = Annotated[str, typer.Option("--detector",
                                            help="Level-1 model file or shipped name.")]
MononuclearModel = Annotated[str, typer.Option("--mononuclear",
                                               help="Level-2 mononuclear model.")]
PolymorphonuclearModel = Annotated[str, typer.Option("--polymorphonuclear",
                                                     help="Level-2 polymorphonuclear model.")]


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


def config_class(name: str) -> type:
    """A command's config dataclass by its name. The config modules import torch and the
    `leukodiff` command starts without it, so they are imported here, when an option's
    default is first needed (inside a function: tests/test_architecture.py sees them)."""
    from leukodiff.evaluation.adaptation import AdaptationConfig
    from leukodiff.evaluation.labs import LabsConfig
    from leukodiff.evaluation.results import EvalConfig
    from leukodiff.training.adapt import AdaptConfig
    from leukodiff.training.adapt_detector import DetectorAdaptConfig
    from leukodiff.training.classifier import ClassifierConfig
    from leukodiff.training.detector import DetectorConfig

    configs = (AdaptationConfig, LabsConfig, EvalConfig, AdaptConfig, DetectorAdaptConfig,
               ClassifierConfig, DetectorConfig)
    return {config.__name__: config for config in configs}[name]


class ConfigDefault:
    """A command option's default, read from a config dataclass's field when it is needed:
    the dataclass is the one place a default is written (without torch, the help names
    the field instead: `config_class`).

    `config` is the dataclass's name (`config()` returns the class); `name` is the field,
    dotted into nested configs (`"spec.group_stain"`). Tuples are shown and given as
    comma-separated text, as the options take them.
    """

    def __init__(self, config: str, name: str) -> None:
        self.config_name, self.name = config, name

    def config(self) -> type:
        return config_class(self.config_name)

    def __call__(self) -> Any:
        try:
            return self._value()
        except ImportError:  # a command without the [torch] extra: say so, no traceback
            _require_torch()
            raise

    def _value(self) -> Any:
        value: Any = self.config()()
        for part in self.name.split("."):
            value = getattr(value, part)
        if isinstance(value, tuple):
            return ",".join(str(v) for v in value)
        return value

    def __str__(self) -> str:
        try:
            return str(self._value())
        except ImportError:  # help without torch
            return f"{self.name} of the config"

    def __bool__(self) -> bool:  # typer's help of a --flag/--no-flag option asks this
        try:
            return bool(self._value())
        except ImportError:
            return False

    def __repr__(self) -> str:
        return f"ConfigDefault({self.name})"
