FROM python:3.12-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY authsvc ./authsvc
COPY workers ./workers
COPY schemas ./schemas
COPY rules ./rules
RUN pip install --no-cache-dir .
ENV AUTHSVC_RULES_DIR=/app/rules AUTHSVC_ENV=production
USER nobody
