# One image for every slotguard process of docker-compose.yml (api, worker, migrate).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
RUN pip install . \
    && useradd --system --no-create-home --shell /usr/sbin/nologin slotguard

USER slotguard
EXPOSE 8000 9101
CMD ["slotguard", "serve", "--host", "0.0.0.0", "--port", "8000"]
