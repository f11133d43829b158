# The Tether server image. Build: docker build -t tether .
# Your own application in it: FROM tether, COPY your module into /app, and name it in the
# command (README.md, "Running in Docker").
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY client ./client
RUN pip install --no-cache-dir .
# The example application: tether serve examples.todos:app (/app is the working directory,
# from which `tether serve MODULE:ATTR` imports).
COPY examples ./examples
# Every directory the server writes to belongs to its user: /data (TETHER_DATA_DIR: the key file
# by default, and an embedded Redis's data) and /keys (the key file docker-compose.yml shares
# between instances). A fresh named volume mounted on either takes this owner and mode.
RUN useradd --system --uid 10001 tether \
    && mkdir -p /data /keys \
    && chown tether /data /keys \
    && chmod 700 /data /keys
USER tether
ENV TETHER_DATA_DIR=/data
EXPOSE 8000
CMD ["tether", "serve", "--host", "0.0.0.0", "--port", "8000"]
