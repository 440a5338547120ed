"""Logging: plain lines, or JSON with LOG_FORMAT=json; each line carries the request id of the
request that wrote it. Tokens in query strings are redacted."""

from __future__ import annotations

import logging

import orjson

from broker.settings import Settings
from broker.web.requestlog import RedactTokens, RequestIdFilter

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "-")
        if request_id != "-":
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(settings: Settings) -> dict[str, object]:
    """A uvicorn log_config: every logger, uvicorn's access log included, through one handler."""
    json = settings.log_format == "json"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactTokens}, "request_id": {"()": RequestIdFilter}},
        "formatters": {"default": {"()": JsonFormatter} if json else {"format": PLAIN_FORMAT}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["redact", "request_id"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["default"], "level": settings.log_level},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": True},
            # Alembic logs each migration it applies with the revision's whole docstring, several
            # lines each, on every first start of `make run`; kept for LOG_LEVEL=DEBUG.
            "alembic": {"level": "DEBUG" if settings.log_level == "DEBUG" else "WARNING"},
        },
    }
