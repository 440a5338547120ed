"""METRICS_PORT: /metrics on a port of its own, off the public one, served by prometheus-client's
small threaded HTTP server for as long as the app runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import start_http_server

from broker.settings import Settings, SettingsError


@contextlib.contextmanager
def metrics_server(settings: Settings) -> Iterator[None]:
    if settings.metrics_port is None:
        yield
        return
    try:
        server, thread = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    except OSError as exc:
        # Typically a second process (a `--workers` sibling) on the same port.
        address = f"{settings.metrics_host}:{settings.metrics_port}"
        raise SettingsError(f"METRICS_PORT: cannot listen on {address}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
