"""`<POISON_APP_PREFIX>/work/{n}` (QoS 1): records each handled message; payload "fail" raises a
multi-line RuntimeError, as database drivers do. POISON_APP_LOG gets one line per handler call.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.router import Router

PREFIX = os.environ.get("POISON_APP_PREFIX", "poison-app")
LOG = Path(os.environ.get("POISON_APP_LOG", "poison-app.log"))


def work(n: str, payload: object) -> None:
    with LOG.open("a") as f:
        f.write(f"{n}\n")
    if payload == "fail":
        raise RuntimeError("first line\nsecond line\r\n\tthird line \x00 \x85 end")


router = Router()
router.on(f"{PREFIX}/work/{{n}}", work, qos=1)
