# The API and the dispatcher: no torch in this image.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY workers ./workers
COPY cli ./cli
COPY migrations ./migrations
COPY examples ./examples
# Editable: the code, migrations/ and examples/ stay where they are in /app.
RUN pip install -e ".[api]"
RUN useradd --create-home fitfleet && mkdir -p /var/lib/fitfleet && chown fitfleet /var/lib/fitfleet
USER fitfleet
EXPOSE 8000
CMD ["fitfleet", "api", "--host", "0.0.0.0", "--port", "8000"]
