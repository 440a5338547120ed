"""A webhook process that dies between its commit and its publish, for the fault tests:
`python -m tests.support.crashing_webhook --port N` (settings from the environment, as the real one)."""

from __future__ import annotations

import argparse
import os

import uvicorn

from broker.ingest import Outcome
from broker.settings import Settings
from webhook.app import create_app

EXIT_CODE = 86


def die_before_publishing(outcome: Outcome) -> None:
    if outcome.to_publish:
        os._exit(EXIT_CODE)  # committed, never published: what a crash at that instant leaves


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = create_app(Settings.from_env(), after_commit=die_before_publishing)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
