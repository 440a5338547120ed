FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY webhook ./webhook
COPY stream ./stream
COPY license_broker ./license_broker
RUN pip install . && useradd --system --no-create-home broker
USER broker
ENV HOST=0.0.0.0
EXPOSE 8000 8001 8002
ENTRYPOINT ["license-broker"]
CMD ["serve"]
