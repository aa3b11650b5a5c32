# rkllm serve in a container, on a board's Rockchip NPU (RK3588 / RK3576; build it on the board, arm64).
#
#   docker build -t rkllm-serve .
#   docker run -d --name rkllm -p 8080:8080 --stop-timeout 45 \
#     --device /dev/dri --device /dev/dma_heap \
#     -v /usr/lib/librkllmrt.so:/usr/lib/librkllmrt.so:ro \
#     -v /opt/rkllm/models:/models:ro -v rkllm-cache:/cache \
#     rkllm-serve --preload qwen3-0.6b
#
# Arguments after the image name are added to `rkllm serve --host 0.0.0.0 --port 8080` (--api-key,
# --max-loaded, --preload, --shutdown-timeout ...; RKLLM_API_KEY works too, with -e).
# - The NPU: the runtime reaches it through the DRM nodes (/dev/dri/card*, /dev/dri/renderD*) and
#   allocates its buffers from /dev/dma_heap/*; pass both directories as devices (or run --privileged).
# - The runtime library is Rockchip's (github.com/airockchip/rknn-llm) and is not in the image:
#   mount the board's librkllmrt.so at RKLLM_LIB_PATH (the 1.2.x and 1.3.x ABIs are both served).
# - Models (*.rkllm) are read from /models; system prompts cached on disk go to /cache.
# - `docker stop` sends SIGTERM: the server stops accepting, lets requests finish for up to
#   --shutdown-timeout seconds (30), closes every model and exits 0; hence --stop-timeout 45 above
#   (docker's own default, 10 s, would kill it first).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RKLLM_MODEL_DIR=/models \
    RKLLM_LIB_PATH=/usr/lib/librkllmrt.so \
    RKLLM_PROMPT_CACHE_DIR=/cache

WORKDIR /src
COPY pyproject.toml README.md ./
COPY rkllm_core ./rkllm_core
COPY langchain_rkllm ./langchain_rkllm
COPY llamaindex_rkllm ./llamaindex_rkllm
COPY llama_index ./llama_index
RUN pip install ".[server]" && cd / && rm -rf /src && mkdir -p /models /cache

WORKDIR /
VOLUME ["/cache"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
ENTRYPOINT ["rkllm", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD []
