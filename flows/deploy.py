"""Deployments of the capfilt flow, served by this process: a scheduled one and an on-demand one.

    capfilt deploy --url-list urls.parquet --human ... --test ...   # serves until Ctrl-C
    prefect deployment run 'capfilt/on-demand' --param rounds=2    # from anywhere that reaches the server

The scheduled deployment re-runs the loop on a cron schedule (nightly by default); point `url_list` at
the file your crawler refreshes, and each night's run builds its generations from the new list.
"""

from __future__ import annotations

from typing import Any

from prefect import serve

from flows.capfilt import capfilt

NIGHTLY = "0 2 * * *"


def deployments(parameters: dict[str, Any], cron: str = NIGHTLY) -> list:
    """The two deployments: `capfilt/nightly` on `cron`, and `capfilt/on-demand` (no schedule)."""
    return [
        capfilt.to_deployment(
            name="nightly",
            cron=cron,
            parameters=parameters,
            description="CapFilt on the newest URL list, on a schedule",
        ),
        capfilt.to_deployment(
            name="on-demand",
            parameters=parameters,
            description="CapFilt when you ask: prefect deployment run 'capfilt/on-demand'",
        ),
    ]


def serve_deployments(parameters: dict[str, Any], cron: str = NIGHTLY) -> None:
    """Register both deployments with the Prefect server (PREFECT_API_URL) and run their flow runs here."""
    serve(*deployments(parameters, cron))
