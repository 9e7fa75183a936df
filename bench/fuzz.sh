#!/usr/bin/env bash
# B14, the long run: schemathesis (all checks, all phases) against the live API's
# /openapi.json, with a token of every role, until at least 10,000 requests were served.
# Prints one JSON line: {"bench": "fuzz", "requests": N, "failures": 0, "seed": S, ...}.
# Uses AUTHSVC_TEST_DATABASE_URL / AUTHSVC_TEST_REDIS_URL when set (as .ci/run does),
# else a SQLite file and an embedded Redis. Exit 1 on any failure or too few requests.
#   bench/fuzz.sh [--examples 300] [--seed 12345] [--min-requests 10000] [--max-time 900]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m tests.security.fuzzrun "$@"
