# The Tether server image. Build: docker build -t tether .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY client ./client
RUN pip install --no-cache-dir .
RUN useradd --system --uid 10001 tether && mkdir -p /data && chown tether /data
USER tether
ENV TETHER_DATA_DIR=/data
EXPOSE 8000
CMD ["tether", "serve", "--host", "0.0.0.0", "--port", "8000"]
