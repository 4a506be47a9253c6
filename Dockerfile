# One image for every clapq process (api, worker, migrate, beat); the command picks the role.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# CUDA build of torch for GPU workers; the project's range admits it.
ARG TORCH="torch==2.13.0"
RUN pip install ${TORCH}
# g++: torch.compile's CPU backend builds its kernels with it (CLAPQ_COMPILE=auto compiles a CPU worker
# in fp32: ingest +7%); without it the worker logs a warning and runs eager
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY clapq ./clapq
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
RUN pip install .
# /models too: a named volume mounted there takes this owner, so the model can be downloaded into it
RUN useradd --create-home clapq && mkdir -p /data /models && chown clapq /data /models
USER clapq
# the compiled kernels live with the data, so a restarted container does not compile again (~50 s)
ENV CLAPQ_DATA_DIR=/data CLAPQ_BLOB_DIR=/data/blobs HF_HOME=/models TORCHINDUCTOR_CACHE_DIR=/data/torch-compile-cache
EXPOSE 8000
CMD ["clapq", "api"]
