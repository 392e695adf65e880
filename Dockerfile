# The anomaly-monitor image: the `anomaly` CLI (serve, replay, train, db upgrade, ...).
#
#   docker build -t anomaly-monitor .                       # CPU torch
#   docker build -t anomaly-monitor:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .   # CUDA torch
#
# torch is installed first from the chosen index, so installing the project never pulls a
# different torch build.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 anomaly \
    && mkdir -p /models /data \
    && chown anomaly:anomaly /models /data

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY anomaly ./anomaly
COPY storage ./storage
COPY streams ./streams
COPY dashboards ./dashboards
# avro: the compose file's avro profile (Schema Registry) and kafka.format: avro need fastavro and
# the registry client.
RUN pip install ".[postgres,grafana,avro]"
# Pipeline configs: /app/examples/*.yaml (mount your own over /app/pipelines).
COPY examples ./examples

USER anomaly
EXPOSE 9108 9109
ENTRYPOINT ["anomaly"]
CMD ["--help"]
