"""Options that set a field of a stage's config dataclass: the dataclass holds the default, the only one.

An option made by `config_option` parses to None when it is not given, and `config_kwargs` passes on only
the options the user gave, so the dataclass fills the rest. `--help` still shows each default: the
formatter reads it from the dataclass, importing its module only when help is printed (the stage modules
import torch; `capfilt COMMAND` must not pay for that before it runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import Any

CONFIG_ATTRIBUTE = "config_class"  # set on an option's argparse action: "module:Class" whose field it sets


def config_option(parser: argparse.ArgumentParser, flag: str, config: str, **kwargs: Any) -> argparse.Action:
    """Add `flag`, setting the field of `config` ("module:Class") named by its dest (`--top-p` -> `top_p`,
    or `dest=`). It parses to None when not given."""
    if kwargs.get("action") == "store_true":  # a flag that turns a field on: absent means "the config's"
        kwargs.update(action="store_const", const=True)
    elif "dest" in kwargs:  # shown as the flag names it, not as the field
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    action = parser.add_argument(flag, default=None, **kwargs)
    setattr(action, CONFIG_ATTRIBUTE, config)
    return action


def config_kwargs(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The fields of `config_class` that the command line gave (not None), by name."""
    return {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(config_class)
        if getattr(args, field.name, None) is not None
    }


def config_default(config: str, field_name: str) -> Any:
    """The default of `field_name` in the dataclass `config` ("module:Class")."""
    module, _, name = config.partition(":")
    field = {field.name: field for field in dataclasses.fields(getattr(importlib.import_module(module), name))}[
        field_name
    ]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


class ConfigDefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends each config option's text with its dataclass default (unless that is None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        config = getattr(action, CONFIG_ATTRIBUTE, None)
        if config is None:
            return action.help
        default = config_default(config, action.dest)
        if default is None:
            return action.help
        return f"{action.help} (default: {default})" if action.help else f"default: {default}"
