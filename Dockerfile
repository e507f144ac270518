FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY plural_cancel ./plural_cancel
COPY config ./config
COPY worker ./worker
COPY tasks ./tasks
COPY sandbox ./sandbox
# SIGTERM becomes Celery's soft shutdown (README, Operations).
ENV REMAP_SIGTERM=SIGQUIT
# The sandbox extra: docker-compose's sandbox service runs `plural-cancel sandbox` from this image.
RUN pip install --no-cache-dir '.[sandbox]' && useradd --system app
USER app
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO"]
