"""Named failpoints for fault tests (`AUTHSVC_FP_<NAME>=sleep:N`), only with AUTHSVC_TESTING=1."""

from __future__ import annotations

import os
import time


def hit(name: str) -> None:
    if os.environ.get("AUTHSVC_TESTING") != "1":
        return
    spec = os.environ.get(f"AUTHSVC_FP_{name}")
    if spec and spec.startswith("sleep:"):
        time.sleep(float(spec.split(":", 1)[1]))
