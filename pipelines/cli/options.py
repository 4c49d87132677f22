"""Options that set a field of a stage's config dataclass, or a parameter of a flow: the dataclass or the
flow's signature holds the default, the only one.

An option made by `config_option` parses to None when it is not given, and `config_kwargs` passes on only
the options the user gave, so the dataclass (or the flow) fills the rest. `--help` still shows each
default: the formatter reads it from its source, importing that module only when help is printed (the
stage modules import torch and the flows Prefect; `capfilt COMMAND` must not pay for that before it runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
from typing import Any

CONFIG_ATTRIBUTE = "config_class"  # set on an option's argparse action: "module:name" whose field it sets


def config_option(parser: argparse.ArgumentParser, flag: str, config: str, **kwargs: Any) -> argparse.Action:
    """Add `flag`, setting the field of `config` ("module:Class", a dataclass, or "module:flow", a function
    or Prefect flow) named by its dest (`--top-p` -> `top_p`, or `dest=`). It parses to None when not given."""
    if kwargs.get("action") == "store_true":  # a flag that turns a field on: absent means "the config's"
        kwargs.update(action="store_const", const=True)
    elif "dest" in kwargs:  # shown as the flag names it, not as the field
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    action = parser.add_argument(flag, default=None, **kwargs)
    setattr(action, CONFIG_ATTRIBUTE, config)
    return action


def config_kwargs(args: argparse.Namespace, target: Any) -> dict[str, Any]:
    """The fields of the dataclass (or parameters of the function or flow) `target` that the command line
    gave (not None), by name."""
    return {name: getattr(args, name) for name in _defaults(target) if getattr(args, name, None) is not None}


def config_default(config: str, name: str) -> Any:
    """The default of field or parameter `name` of `config` ("module:name")."""
    module, _, attribute = config.partition(":")
    return _defaults(getattr(importlib.import_module(module), attribute))[name]


def _defaults(target: Any) -> dict[str, Any]:
    """{name: default} of a dataclass's fields or a function's (or Prefect flow's) parameters; None where
    there is none."""
    if dataclasses.is_dataclass(target):
        return {field.name: _field_default(field) for field in dataclasses.fields(target)}
    parameters = inspect.signature(getattr(target, "fn", target)).parameters  # a Prefect flow wraps `fn`
    return {name: None if p.default is inspect.Parameter.empty else p.default for name, p in parameters.items()}


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


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
