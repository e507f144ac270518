FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY plural_cancel ./plural_cancel
COPY config ./config
COPY worker ./worker
COPY tasks ./tasks
COPY sandbox ./sandbox
# SIGTERM becomes Celery's soft shutdown (docs/operations.md).
ENV REMAP_SIGTERM=SIGQUIT
# The sandbox extra: docker-compose's sandbox service runs `plural-cancel sandbox` from this image.
# The installed package is the one that runs: `celery -A worker` puts the working directory
# first on sys.path, where this copy of plural_cancel/ (without the subpackages, which pip
# put inside the installed one) would shadow it. The folders stay, for their short names.
RUN pip install --no-cache-dir '.[sandbox]' && rm -rf plural_cancel && useradd --system app
USER app
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO"]
