# syntax=docker/dockerfile:1
# ocsp-responder: a small non-root image. Build:  docker build -t ocsp-responder .
# Run: see docs/deploy.md ("Docker"). The configuration, issuer certificates and keys are
# mounted read-only at /etc/ocsp-responder; nothing in the image is secret.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the project and its dependencies into a self-contained venv --------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY responder ./responder
COPY signer ./signer
RUN python -m venv /opt/ocsp-responder \
 && /opt/ocsp-responder/bin/pip install --upgrade pip \
 && /opt/ocsp-responder/bin/pip install '.[pkcs11]'

# --- runtime: the venv, an unprivileged user, nothing else ---------------------------
FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent \
        --no-create-home --shell /usr/sbin/nologin ocsp
COPY --from=build /opt/ocsp-responder /opt/ocsp-responder
ENV PATH=/opt/ocsp-responder/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OCSP_RESPONDER_CONFIG=/etc/ocsp-responder/responder.toml \
    OCSP_RESPONDER_LISTEN=0.0.0.0:8080 \
    OCSP_RESPONDER_ADMIN_LISTEN=0.0.0.0:8081 \
    OCSP_RESPONDER_LOG_FORMAT=json \
    OCSP_HEALTHCHECK_URL=http://127.0.0.1:8080/healthz
USER 10001:10001
EXPOSE 8080 8081
# Liveness only (the event loop answers): readiness (/readyz) is for load balancers, and a
# database outage must not get a container that still serves from its cache restarted.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['OCSP_HEALTHCHECK_URL'], timeout=2).status == 200 else 1)"]
ENTRYPOINT ["ocsp-responder"]
CMD ["serve"]
