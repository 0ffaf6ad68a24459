FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package root is the repository root (pyproject maps `nalar` to "."), so this copies
# pyproject.toml, README.md and the source; .dockerignore keeps the venv, git metadata, caches
# and tests out of the build context.
COPY . .
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 nalar \
    && mkdir /data && chown nalar /data

USER nalar

CMD ["nalar", "node", "--demo", "--nats", "nats://nats:4222"]
