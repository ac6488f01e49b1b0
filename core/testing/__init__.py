"""`from core.testing import TestClient`: run an app's routes in-process, without a broker (`core.testing.client`).

The records it returns are in `core.testing.records`, what stands in for the broker and Redis in
`core.testing.doubles`.
"""

from core.testing.client import TestClient
from core.testing.records import (DeadLetterRecord, HandlerCall, PublishedMessage, PublishResult, StreamDeadLetter,
                                  StreamEntry, TestClientError)

__all__ = ["TestClient", "PublishResult", "PublishedMessage", "DeadLetterRecord", "HandlerCall", "TestClientError",
           "StreamEntry", "StreamDeadLetter"]
