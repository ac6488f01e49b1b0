# mqtt-app: python main.py --workers in a slim image, as a non-root user.
# Build: docker build -t mqtt-app .      Run: see docker-compose.yml and deploy/kubernetes/.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080

WORKDIR /app

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app

# Runtime dependencies only (the test tools are in requirements-dev.txt); all install from wheels.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# The code is owned by root and read-only for the app user; only /app/data is writable
# (e.g. DATABASE_URL=sqlite+aiosqlite:////app/data/app.db).
COPY core/ core/
COPY bootstrap/ bootstrap/
COPY app/ app/
COPY main.py ./
RUN mkdir -p /app/data && chown app:app /app/data

USER 10001:10001
EXPOSE 8080

# /health answers 200 while the supervisor is alive and has not given up on a worker.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/health' % os.environ.get('HTTP_PORT', '8080'); sys.exit(0 if urllib.request.urlopen(url, timeout=3).status == 200 else 1)"]

# SIGTERM starts a graceful drain of every worker (up to SHUTDOWN_TIMEOUT seconds).
STOPSIGNAL SIGTERM
CMD ["python", "main.py", "--workers"]
