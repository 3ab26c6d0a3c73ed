# The GPU worker: Celery plus the training engine on PyTorch's CUDA wheels
# (torch 2.14.1 from PyPI carries its CUDA libraries; the host needs the NVIDIA
# driver and the container toolkit, nothing else).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY workers ./workers
COPY cli ./cli
COPY migrations ./migrations
COPY examples ./examples
# Editable: the code, migrations/ and examples/ stay where they are in /app.
RUN pip install -e ".[worker]"
RUN useradd --create-home fitfleet && mkdir -p /var/lib/fitfleet && chown fitfleet /var/lib/fitfleet
USER fitfleet
CMD ["fitfleet", "worker", "--queues", "gpu", "--concurrency", "1"]
