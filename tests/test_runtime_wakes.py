"""Runtime backpressure: the loop thread wakes the paused network thread once per pause, not per handler."""

from __future__ import annotations

from core.foundation.config import load_settings
from core.router import Router
from core.runtime.runtime import Runtime


async def handle() -> None:
    return None


def test_handlers_finishing_below_the_resume_mark_wake_the_network_thread_once() -> None:
    router = Router()
    router.on("t", handle)
    runtime = Runtime(load_settings({"MQTT_CLIENT_ID": "t", "MAX_INFLIGHT": "8"}), router.routes)
    wakes: list[int] = []
    runtime.client.wake = lambda: wakes.append(1)  # type: ignore[method-assign]
    runtime._loop = None  # no loop: the inbox hand-over is not under test here
    dispatcher = runtime.dispatcher

    runtime._received = 8
    assert runtime._has_room() is False  # MAX_INFLIGHT reached: paused
    for done in range(1, 9):  # resume mark: 6 outstanding
        dispatcher.completed = done
        runtime._on_complete()
    assert len(wakes) == 1

    assert runtime._has_room() is True  # the network thread looked again and reads on
    runtime._received = 16
    assert runtime._has_room() is False  # the next pause
    for done in range(9, 17):
        dispatcher.completed = done
        runtime._on_complete()
    assert len(wakes) == 2
    runtime.executor.shutdown()
