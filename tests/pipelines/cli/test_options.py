"""The command line's config options: the dataclass holds each default, --help shows it."""

import argparse
import dataclasses
import importlib
from pathlib import Path

from pipelines.cli.main import build_parser
from pipelines.cli.options import CONFIG_ATTRIBUTE, config_kwargs
from pipelines.stages.caption import CaptionConfig
from pipelines.training.config import TrainConfig


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_config_option_sets_a_field_of_its_config():
    options = [
        (name, action)
        for name, command in subcommands(build_parser()).items()
        for action in command._actions
        if getattr(action, CONFIG_ATTRIBUTE, None)
    ]
    assert len(options) > 25
    for name, action in options:
        module, _, class_name = getattr(action, CONFIG_ATTRIBUTE).partition(":")
        fields = {field.name for field in dataclasses.fields(getattr(importlib.import_module(module), class_name))}
        assert action.dest in fields, f"capfilt {name} {action.option_strings}: no field {action.dest!r}"
        assert action.default is None, f"capfilt {name} {action.option_strings} has a default of its own"


def test_options_not_given_leave_the_dataclass_defaults():
    parser = build_parser()
    args = parser.parse_args(["caption", "--generation", "1", "--checkpoint", "ckpt"])
    assert config_kwargs(args, CaptionConfig) == {"checkpoint": Path("ckpt")}
    args = parser.parse_args(
        [
            "caption",
            "--generation",
            "1",
            "--checkpoint",
            "ckpt",
            "--num-captions",
            "3",
            "--gpus-per-actor",
            "0.5",
            "--executor",
            "local",
        ]
    )
    assert config_kwargs(args, CaptionConfig) == {
        "checkpoint": Path("ckpt"),
        "num_captions": 3,
        "num_gpus": 0.5,
        "executor": "local",
    }
    args = parser.parse_args(
        ["pretrain", "--generation", "0", "--run-dir", "run", "--max-steps", "5", "--gpu", "--workers", "2"]
    )
    assert config_kwargs(args, TrainConfig) == {"max_steps": 5, "use_gpu": True, "num_workers": 2}


def test_help_shows_the_dataclass_default():
    caption_help = subcommands(build_parser())["caption"].format_help()
    defaults = {field.name: field.default for field in dataclasses.fields(CaptionConfig)}
    flat = " ".join(caption_help.split())
    assert f"K, synthetic captions per image (default: {defaults['num_captions']})" in flat
    assert f"nucleus sampling mass (default: {defaults['top_p']})" in flat
    assert f"GPUs per actor; 0 runs on the CPU (default: {defaults['num_gpus']})" in flat
