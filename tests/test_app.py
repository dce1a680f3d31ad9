"""The app's lifespan: what it sets up for the process besides the runtime."""

from __future__ import annotations

import gc

import pytest

from tests.servers import make_settings, run_broker

pytestmark = pytest.mark.core


async def test_start_up_s_objects_are_kept_out_of_the_cyclic_gc_while_serving(redis_url: str) -> None:
    # Frozen after start-up (broker.app.freeze_heap): a full collection then walks only what
    # came since, instead of every module, class and function loaded (tens of milliseconds).
    assert gc.get_freeze_count() == 0
    async with run_broker(make_settings(redis_url)):
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0  # collectable again once the app is gone
