# The gradwatch server (API + dashboard) without torch: the training side sends to it over HTTP.
# Configured only through environment variables (see docker-compose.yml and the README):
#   GRADWATCH_DATABASE_URL  database (PostgreSQL: postgresql+psycopg://USER:PASS@HOST:5432/DB)
#   GRADWATCH_TOKEN         bearer token required by every API call (GRADWATCH_READ_TOKEN: reads only)
#   GRADWATCH_HOST, GRADWATCH_PORT   bind address and port inside the container (0.0.0.0, 8000)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADWATCH_HOST=0.0.0.0 GRADWATCH_PORT=8000

WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent agent
COPY server server
COPY dashboard dashboard
COPY migrations migrations
COPY cli cli
RUN pip install ".[server,postgres,dashboard]" && rm -rf /src \
    && useradd --create-home --uid 10001 gradwatch
USER gradwatch
WORKDIR /home/gradwatch

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$GRADWATCH_PORT/healthz', timeout=4)"
# migrations first (serialised across replicas by an advisory lock), then serve
CMD ["sh", "-c", "gradwatch db upgrade && exec gradwatch serve --host \"$GRADWATCH_HOST\" --port \"$GRADWATCH_PORT\""]
