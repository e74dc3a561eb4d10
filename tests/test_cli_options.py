"""The commands' settings are the config dataclasses': every field of a command's config
can be set by an option of that command, and the option's default is read from the field
(`cli.common.ConfigDefault`), so a default is written once, in the dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import typer
from typer.testing import CliRunner

from leukodiff.cli import app
from leukodiff.cli.common import ConfigDefault
from leukodiff.evaluation.adaptation import AdaptationConfig
from leukodiff.evaluation.labs import LabsConfig
from leukodiff.evaluation.results import EvalConfig
from leukodiff.server.cli import MB, MEGAPIXEL
from leukodiff.server.settings import Listening, Settings
from leukodiff.training.adapt import AdaptConfig
from leukodiff.training.adapt_detector import DetectorAdaptConfig
from leukodiff.training.classifier import ClassifierConfig
from leukodiff.training.detector import DetectorConfig


@dataclass(frozen=True)
class Settable:
    """A command and the config it builds: `options` names the option of a field where it
    is not the field's own name; `not_options` the fields left out, each with its reason;
    `shared` the fields whose option (and default) another config of the command owns."""

    command: tuple[str, ...]
    config: type
    options: dict[str, str] = field(default_factory=dict)
    not_options: dict[str, str] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)


NESTED_SPEC = ("the detector's network (DetectorSpec): its shape and inference settings are "
               "a spec, not a training setting; the ones a recipe changes are options")
SETTABLE = [
    Settable(("train", "classifier"), ClassifierConfig),
    Settable(("train", "detector"), DetectorConfig,
             options={"color_jitter": "colour_jitter", "spec.group_classifier":
                      "group_classifier", "spec.colour_standardise": "colour_standardise",
                      "spec.group_stain": "group_stain", "spec.score": "score",
                      "spec.other_cell_class": "other_cell_class"},
             not_options={"spec": NESTED_SPEC}),
    Settable(("evaluate", "labs"), LabsConfig),
    Settable(("evaluate", "adaptation"), AdaptationConfig,
             options={"adapt.epochs": "epochs"},
             not_options={"adapt": "the adaptation recipe is `leukodiff adapt`'s; the curve "
                                   "varies only its epochs",
                          "detector": "the detector's adaptation recipe is `leukodiff "
                                      "adapt`'s"}),
    Settable(("evaluate", "all"), EvalConfig,
             not_options={"head": "the paper's head (HeadConfig): the protocol fixes it"}),
    Settable(("adapt",), AdaptConfig),
    Settable(("adapt",), DetectorAdaptConfig,
             options={"epochs": "detector_epochs", "lr": "detector_lr",
                      "batch_size": "detector_batch_size", "validation": "detector_validation",
                      "seed": "detector_seed"},
             shared={"held_out": "AdaptConfig's: both levels hold out the same share of "
                                 "the lab's cases"}),
]


def _command(path: tuple[str, ...]):
    command = typer.main.get_command(app)
    for name in path:
        command = command.get_command(None, name)
    return command


def _field_paths(settable: Settable) -> list[str]:
    paths = [f.name for f in dataclasses.fields(settable.config)
             if f.name not in settable.not_options]
    return paths + [p for p in settable.options if "." in p]


@pytest.mark.parametrize("settable", SETTABLE, ids=lambda s: " ".join(s.command)
                         + f" {s.config.__name__}")
def test_every_config_field_is_an_option_whose_default_is_the_field(settable):
    params = {p.name: p for p in _command(settable.command).params}
    for path in _field_paths(settable):
        name = settable.options.get(path, path)
        assert name in params, f"`leukodiff {' '.join(settable.command)}` has no option for " \
                               f"{settable.config.__name__}.{path}"
        default = params[name].default
        assert isinstance(default, ConfigDefault), f"--{name}: default written again"
        if path not in settable.shared:
            assert default.config() is settable.config and default.name == path, name
        value = settable.config()
        for part in path.split("."):
            value = getattr(value, part)
        given = default()
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        assert given == value, (name, given, value)


#: `leukodiff serve`: the option of each field of the station's settings, with the unit the
#: option counts in, or the reason a field has none.
SERVE_OPTIONS = {"max_upload_bytes": ("max_upload_mb", MB),
                 "max_image_pixels": ("max_image_mp", MEGAPIXEL),
                 "max_files_per_request": ("max_files", 1)}
SERVE_NOT_OPTIONS = {
    "secret_key": "a secret on a command line is seen by every user of the machine (ps); "
                  "it lives in DATA_DIR/secret_key",
    "adapt_job": "the adapt job's nested recipe (`adapt_job.AdaptJobConfig`); its defaults "
                 "are `leukodiff adapt`'s",
}


@pytest.mark.parametrize("config", [Settings, Listening])
def test_every_serve_setting_is_an_option_whose_default_is_the_setting(config):
    params = {p.name: p for p in _command(("serve",)).params}
    for setting in dataclasses.fields(config):
        if setting.name in SERVE_NOT_OPTIONS:
            continue
        name, unit = SERVE_OPTIONS.get(setting.name, (setting.name, 1))
        assert name in params, f"`leukodiff serve` has no option for {setting.name}"
        default = params[name].default
        assert default == (setting.default // unit if unit > 1 else setting.default), name


def test_the_help_shows_the_dataclass_defaults():
    result = CliRunner().invoke(app, ["train", "classifier", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "[default: pbc,bccd]" in result.output and "[default: 12]" in result.output


def test_an_option_reaches_the_config(tmp_path):
    # a bad value set on the command line is the config's to refuse: one clear message
    result = CliRunner().invoke(app, ["train", "classifier", "--out", str(tmp_path / "run"),
                                      "--augmentation", "nonesuch"])
    assert result.exit_code == 1, result.output
    assert "unknown augmentation 'nonesuch'" in result.output
    assert "Traceback" not in result.output


def test_scoring_by_group_asks_to_leave_out_the_other_cell_class(tmp_path):
    # the other-cell class is on by default and needs the cell score: one clear message
    # naming the way out, before any data is read
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "detector", "--out", str(out),
                                      "--score", "group"])
    assert result.exit_code == 1, result.output
    assert "--no-other-cells" in result.output and "Traceback" not in result.output
    assert not out.exists()
