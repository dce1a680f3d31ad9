"""Take the dashboard screenshots in this folder: a real broker under load, in headless Chromium.

    .venv/bin/python docs/screenshots/make_screenshot.py [--seconds 300]

Starts a private ``redis-server`` and two broker processes on free ports, runs the load of
``tests/browser.py`` (``DEMO_LOAD``: five queues with producers and WebSocket consumers, some
failing, one slow, one paused) for ``--seconds`` so that the charts have history, then saves
``dashboard.png``, ``dashboard-dark.png`` and ``queue.png`` (the ``webhooks`` queue) here.
Needs Debian's ``chromium`` at ``/usr/bin/chromium``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from tests.browser import DEMO_LOAD, Load, launch_chromium  # noqa: E402
from tests.servers import BrokerServer, RedisServer  # noqa: E402

VIEWPORT = {"width": 1440, "height": 900}


async def shoot(url: str) -> None:
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright)
        # (colour scheme, view, file, height: None = the whole page; the queue view's 50 dead letters are cut)
        shots = [
            ("light", "", "dashboard.png", None),
            ("dark", "", "dashboard-dark.png", None),
            ("light", "#/queue/webhooks", "queue.png", 1400),
        ]
        for scheme, view, name, height in shots:
            context = await browser.new_context(viewport=VIEWPORT, color_scheme=scheme)  # type: ignore[arg-type]
            page = await context.new_page()
            await page.goto(f"{url}/{view}")
            await expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", "live", timeout=15_000)
            # Rates need two frames; a few more let the live events list fill in.
            for _ in range(4):
                ts = await page.get_by_test_id("last-update").get_attribute("data-ts") or ""
                await expect(page.get_by_test_id("last-update")).not_to_have_attribute("data-ts", ts, timeout=5_000)
            await page.mouse.move(0, 0)
            clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height} if height else None
            await page.screenshot(path=HERE / name, full_page=True, clip=clip)  # type: ignore[arg-type]
            print(f"wrote {HERE / name}")
            await context.close()
        await browser.close()


async def main(seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="presque-shot-") as tmp:
        redis = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        brokers = []
        try:
            brokers = [BrokerServer(Path(tmp) / f"broker-{n}", redis.url).start() for n in range(2)]
            print(f"dashboard: {brokers[0].url}/  (load for {seconds:.0f} s)")
            async with Load(brokers[0].url, DEMO_LOAD, consumer_urls=[b.url for b in brokers]):
                end = time.monotonic() + seconds
                while (left := end - time.monotonic()) > 0:
                    await asyncio.sleep(min(30.0, left))  # a script, not a test: the load just runs
                    print(f"  {max(0.0, end - time.monotonic()):.0f} s left")
                await shoot(brokers[0].url)
        finally:
            for broker in brokers:
                broker.stop()
            redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="how long the load runs before the shots")
    asyncio.run(main(parser.parse_args().seconds))
