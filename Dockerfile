FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# The exact versions, each checked against its hash (requirements.lock, `make lock`), then the
# project itself with nothing more resolved: what runs is what was locked and audited.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY webhook ./webhook
COPY stream ./stream
COPY license_broker ./license_broker
RUN pip install --no-deps --no-build-isolation . && pip check && useradd --system --no-create-home broker
USER broker
EXPOSE 8000 8001 8002
ENTRYPOINT ["license-broker"]
# Every interface of the container; development mode (BROKER_DEV) is refused on such a host.
CMD ["serve", "--host", "0.0.0.0"]
