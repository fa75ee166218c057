# fieldcrypt as a sidecar: a slim Python image, a non-root user, secrets through *_FILE.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# The same install the tests use (pip install of this project), without dev extras.
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home fieldcrypt

USER 10001
ENV FIELDCRYPT_LISTEN=0.0.0.0:6380 \
    FIELDCRYPT_METRICS_LISTEN=0.0.0.0:9180 \
    FIELDCRYPT_LOG_FORMAT=json
EXPOSE 6380 9180

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9180/healthz', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["fieldcrypt"]
CMD ["serve"]
