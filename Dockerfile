# The lamost-vac application image: CLI, Celery worker/beat and the API (gunicorn).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY etl ./etl
COPY models ./models
COPY service ./service
COPY migrations ./migrations
RUN pip install --no-cache-dir . gunicorn

# One non-root user for every process of the deployment.
RUN useradd --create-home --uid 1000 lamost && mkdir -p /models && chown lamost /models
USER lamost
EXPOSE 8000
# Workers, timeouts and request limits: service/gunicorn_conf.py (see README, "Running it
# for real"); flags given after it override it.
CMD ["gunicorn", "-c", "python:service.gunicorn_conf", "-b", "0.0.0.0:8000", "service.app:create_app()"]
