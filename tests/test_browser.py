"""The dashboard and the example consumer page in real headless Chromium (Playwright).

Each test drives a real broker on real Redis and asserts on what a user sees, through the pages'
``data-testid`` / ``data-value`` attributes (docs/dashboard.md lists them). One browser serves
the whole module; each test gets a fresh browser context (its own localStorage) and broker.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from tests.browser import BrokerHttp, launch_chromium, require_chromium
from tests.servers import BrokerServer, RunningBroker, make_settings, run_broker, wait_for

try:
    from playwright.async_api import Browser, BrowserContext, Locator, Page, WebSocketRoute, expect
except ImportError:  # pragma: no cover - depends on the machine
    if os.environ.get("CI"):
        raise
    pytest.skip("browser tests skipped: the playwright package is missing (make install)", allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

expect.set_options(timeout=10_000)

# The promise: dashboard numbers follow a push "within ~2 s" (stats frames come about once a second).
FEED_DEADLINE_MS = 2_500
OPS_TOKEN = "ops-secret-token"
AUTH = {
    "auth": {
        "tokens": [
            {"name": "ops", "token": OPS_TOKEN, "roles": {"admin": ["*"], "produce": ["*"], "consume": ["*"]}},
        ]
    }
}


# -- fixtures ----------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright)
        yield browser
        await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh context; an uncaught error in any of its pages fails the test."""
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    ctx.on("page", lambda page: page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}")))
    yield ctx
    await ctx.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest_asyncio.fixture(loop_scope="module")
async def broker(redis_url: str) -> AsyncIterator[RunningBroker]:
    async with run_broker(make_settings(redis_url)) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def http(broker: RunningBroker) -> AsyncIterator[BrokerHttp]:
    async with BrokerHttp(broker.url) as client:
        yield client


# -- helpers -----------------------------------------------------------------------------------------


def tid(page: Page, testid: str) -> Locator:
    return page.get_by_test_id(testid)


async def value_is(page: Page, testid: str, value: Any, timeout: float | None = None) -> None:
    await expect(tid(page, testid)).to_have_attribute("data-value", str(value), timeout=timeout)


async def open_dashboard(context: BrowserContext, url: str, view: str = "") -> Page:
    """The dashboard (``view``: e.g. ``#/queue/name``), once live and showing a stats frame."""
    page = await context.new_page()
    await page.goto(f"{url}/{view}")
    await expect(tid(page, "conn-state")).to_have_attribute("data-state", "live")
    await expect(tid(page, "last-update")).to_have_attribute("data-ts", re.compile(r"\d"))
    return page


async def open_consumer(context: BrowserContext, url: str, queue: str, work_ms: int = 0) -> Page:
    """The example consumer page working on ``queue`` (``work_ms`` per job), once subscribed."""
    page = await context.new_page()
    await page.goto(f"{url}/examples/consumer.html?queue={queue}")
    await tid(page, "delay-input").fill(str(work_ms))
    await expect(tid(page, "sub-state")).to_have_attribute("data-state", "subscribed")
    await expect(tid(page, "conn-state")).to_have_attribute("data-state", "live")
    return page


def job_item(page: Page, job_id: str) -> Locator:
    return page.locator(f'[data-testid="job-item"][data-job="{job_id}"]')


async def next_frame(page: Page) -> None:
    """Wait until the dashboard has drawn a stats frame newer than the one it shows now."""
    ts = await tid(page, "last-update").get_attribute("data-ts")
    await expect(tid(page, "last-update")).not_to_have_attribute("data-ts", ts or "")


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, message: str = "") -> Any:
    return await wait_for(predicate, timeout, interval=0.05, message=message)


# -- the dashboard follows the feed -------------------------------------------------------------


async def test_numbers_follow_http_pushes_without_reload(
    broker: RunningBroker, context: BrowserContext, http: BrokerHttp
) -> None:
    page = await open_dashboard(context, broker.url)
    await expect(tid(page, "queues-empty")).to_be_visible()
    await page.evaluate("window.__sameDocument = true")

    await http.push_many("numbers", [{"n": n} for n in range(3)])
    await value_is(page, "queue-numbers-ready", 3, timeout=FEED_DEADLINE_MS)
    await value_is(page, "total-pushed", 3)
    await expect(tid(page, "queue-row-numbers")).to_be_visible()
    await expect(tid(page, "queues-empty")).to_be_hidden()
    await expect(tid(page, "queue-numbers-ready")).to_have_text("3")

    # A second change: a destructive fetch and more pushes, still the same document.
    response = await http.client.get("/q/numbers")
    assert response.status_code == 200
    await http.push_many("numbers", [{"n": n} for n in range(3, 1003)])
    await value_is(page, "queue-numbers-ready", 1002, timeout=FEED_DEADLINE_MS)
    await value_is(page, "total-processed", 1, timeout=FEED_DEADLINE_MS)
    await expect(tid(page, "queue-numbers-ready")).to_have_text("1k")
    await value_is(page, "total-queues", 1)
    await value_is(page, "processes-count", 1)
    assert await page.evaluate("window.__sameDocument") is True, "the page was reloaded"


async def test_charts_drawn_from_history_after_reload(
    broker: RunningBroker, context: BrowserContext, http: BrokerHttp
) -> None:
    await http.push_many("charted", [{"n": n} for n in range(5)])

    async def recorded() -> bool:
        ready = (await http.history())["queues"].get("charted", {}).get("ready", [])
        return sum(v is not None for v in ready) >= 3

    await eventually(recorded, message="no three seconds of history recorded")
    page = await open_dashboard(context, broker.url)
    await value_is(page, "queue-charted-ready", 5)

    # Reload with the live feed cut off: whatever the charts show now came from /stats/history.
    async def mute(ws: WebSocketRoute) -> None:
        return None  # not connected to the broker: the page's socket opens and nothing ever arrives

    await page.route_web_socket(re.compile(r"/ws$"), mute)
    await page.reload()
    await expect(tid(page, "chart-depth")).to_have_attribute("data-points", re.compile(r"^([3-9]|\d\d+)$"))
    await expect(tid(page, "chart-throughput")).to_have_attribute("data-points", re.compile(r"^([2-9]|\d\d+)$"))
    await expect(tid(page, "charts-note")).to_be_hidden()
    assert await tid(page, "last-update").get_attribute("data-ts") is None, "a live frame got through"
    assert await page.locator('[data-testid="chart-depth"] canvas').count() == 1


# -- queue controls -----------------------------------------------------------------------------


async def test_pause_stops_delivery_and_resume_restarts_it(
    broker: RunningBroker, context: BrowserContext, http: BrokerHttp
) -> None:
    consumer = await open_consumer(context, broker.url, "pausable")
    await http.push_many("pausable", [{"n": n} for n in range(2)])
    await value_is(consumer, "count-acked", 2)

    page = await open_dashboard(context, broker.url, "#/queue/pausable")
    await expect(tid(page, "queue-title")).to_have_text("pausable")
    await expect(tid(page, "btn-resume")).to_be_disabled()
    await tid(page, "btn-pause").click()
    await expect(tid(page, "queue-paused")).to_be_visible()
    await expect(tid(page, "btn-pause")).to_be_disabled()
    await expect(tid(page, "btn-resume")).to_be_enabled()
    assert await http.paused("pausable")

    await http.push_many("pausable", [{"n": n} for n in range(2, 5)])
    await value_is(page, "qv-ready", 3)
    await next_frame(page)  # a full stats period later, still waiting
    await value_is(page, "qv-ready", 3)
    await value_is(consumer, "count-received", 2)
    await value_is(consumer, "count-inflight", 0)

    await tid(page, "btn-resume").click()
    await value_is(consumer, "count-acked", 5)
    await expect(tid(page, "queue-paused")).to_be_hidden()
    await value_is(page, "qv-ready", 0)
    assert not await http.paused("pausable")


async def test_purge_asks_first(broker: RunningBroker, context: BrowserContext, http: BrokerHttp) -> None:
    await http.push_many("purgeable", [{"n": n} for n in range(4)])
    page = await open_dashboard(context, broker.url, "#/queue/purgeable")
    await expect(tid(page, "peek-item")).to_have_count(4)

    await tid(page, "btn-purge").click()
    await expect(tid(page, "confirm-dialog")).to_be_visible()
    await expect(tid(page, "confirm-text")).to_contain_text("purgeable")
    await tid(page, "confirm-cancel").click()
    await expect(tid(page, "confirm-dialog")).to_be_hidden()
    assert (await http.info("purgeable"))["ready"] == 4

    await tid(page, "btn-purge").click()
    await tid(page, "confirm-ok").click()
    await expect(tid(page, "peek-empty")).to_be_visible()
    await expect(tid(page, "peek-item")).to_have_count(0)
    await value_is(page, "qv-ready", 0)
    assert (await http.info("purgeable"))["ready"] == 0


# -- dead letters -------------------------------------------------------------------------------


async def test_retry_from_dead_letters_delivers_the_job_again(
    broker: RunningBroker, context: BrowserContext, http: BrokerHttp
) -> None:
    [job_id] = await http.make_dead("deadq", 1, error="ValueError: bad input")
    page = await open_dashboard(context, broker.url, "#/queue/deadq")
    row = tid(page, f"dead-row-{job_id}")
    await expect(row).to_be_visible()
    await expect(row).to_contain_text("ValueError: bad input")
    await value_is(page, "qv-dead", 1)

    consumer = await open_consumer(context, broker.url, "deadq")
    await tid(page, f"btn-dead-retry-{job_id}").click()
    await expect(row).to_have_count(0)
    await expect(job_item(consumer, job_id)).to_have_attribute("data-outcome", "acked")
    await value_is(consumer, "count-acked", 1)
    await value_is(page, "qv-dead", 0)
    await expect(tid(page, "dead-empty")).to_be_visible()
    info = await http.info("deadq")
    assert (info["dead"], info["job_processed"], info["ready"]) == (0, 1, 0)


async def test_delete_one_dead_job_then_all(broker: RunningBroker, context: BrowserContext, http: BrokerHttp) -> None:
    first, second, third = await http.make_dead("graveyard", 3)
    page = await open_dashboard(context, broker.url, "#/queue/graveyard")
    await expect(tid(page, "dead-table").locator("tbody tr")).to_have_count(3)
    await expect(tid(page, "dead-total")).to_have_attribute("data-value", "3")

    await tid(page, f"btn-dead-delete-{second}").click()
    await expect(tid(page, f"dead-row-{second}")).to_have_count(0)
    await expect(tid(page, "dead-total")).to_have_attribute("data-value", "2")
    assert sorted(j["id"] for j in (await http.dead("graveyard"))["jobs"]) == sorted([first, third])

    await tid(page, "btn-dead-delete-all").click()
    await expect(tid(page, "confirm-dialog")).to_be_visible()
    await expect(tid(page, "confirm-text")).to_contain_text("graveyard")
    await page.keyboard.press("Escape")  # cancels, as the Cancel button does
    await expect(tid(page, "confirm-dialog")).to_be_hidden()
    await expect(tid(page, f"dead-row-{first}")).to_be_visible()
    assert (await http.dead("graveyard"))["total"] == 2

    await tid(page, "btn-dead-delete-all").click()
    await tid(page, "confirm-ok").click()
    await expect(tid(page, "dead-empty")).to_be_visible()
    await expect(tid(page, "dead-table").locator("tbody tr")).to_have_count(0)
    await value_is(page, "qv-dead", 0)
    assert (await http.dead("graveyard"))["total"] == 0


# -- the example consumer page ------------------------------------------------------------------


async def test_example_page_consumes_and_acks_http_pushes(
    broker: RunningBroker, context: BrowserContext, http: BrokerHttp
) -> None:
    total = 40
    consumer = await open_consumer(context, broker.url, "browser-work", work_ms=5)
    ids = await http.push_many("browser-work", [{"n": n} for n in range(total)])
    await value_is(consumer, "count-acked", total)
    await value_is(consumer, "count-received", total)
    for name in ("count-failed", "count-lost", "count-inflight"):
        await value_is(consumer, name, 0)
    await expect(consumer.locator('[data-testid="job-item"][data-outcome="acked"]')).to_have_count(total)
    await expect(job_item(consumer, ids[0])).to_have_attribute("data-attempt", "1")

    async def all_processed() -> bool:
        info = await http.info("browser-work")
        return bool(info["job_processed"] == total and info["ready"] == 0 and info["leased"] == 0)

    await eventually(all_processed, message="the broker does not count every job as processed")


# -- restarts and auth --------------------------------------------------------------------------


async def test_pages_survive_a_broker_restart(
    redis_url: str, make_broker: Callable[..., BrokerServer], context: BrowserContext
) -> None:
    server = await asyncio.to_thread(make_broker, redis_url)
    async with BrokerHttp(server.url) as http:
        consumer = await open_consumer(context, server.url, "durable")
        page = await open_dashboard(context, server.url)
        await http.push_many("durable", [{"n": n} for n in range(5)])
        await value_is(consumer, "count-acked", 5)
        await value_is(page, "total-processed", 5)

        await asyncio.to_thread(server.stop)
        for p in (page, consumer):
            await expect(tid(p, "conn-state")).to_have_attribute("data-state", "reconnecting")
        await asyncio.to_thread(server.start)
        for p in (page, consumer):
            await expect(tid(p, "conn-state")).to_have_attribute("data-state", "live", timeout=30_000)

        await http.push_many("durable", [{"n": n} for n in range(5, 10)])
        await value_is(consumer, "count-acked", 10)
        await value_is(page, "total-processed", 10)
        await expect(tid(consumer, "sub-state")).to_have_attribute("data-state", "subscribed")
        await value_is(consumer, "count-lost", 0)


async def test_token_prompt_unlocks_the_dashboard(redis_url: str, context: BrowserContext) -> None:
    async with run_broker(make_settings(redis_url, AUTH)) as broker, BrokerHttp(broker.url, OPS_TOKEN) as http:
        page = await context.new_page()
        await page.goto(f"{broker.url}/")
        await expect(tid(page, "auth-dialog")).to_be_visible()
        await expect(tid(page, "auth-reason")).to_contain_text("requires a token")
        await expect(tid(page, "conn-state")).to_have_attribute("data-state", "unauthorized")

        await tid(page, "auth-token-input").fill("not-the-token")
        await tid(page, "auth-token-input").press("Enter")
        await expect(tid(page, "auth-reason")).to_contain_text("refused")
        await expect(tid(page, "auth-dialog")).to_be_visible()

        await tid(page, "auth-token-input").fill(OPS_TOKEN)
        await tid(page, "auth-submit").click()
        await expect(tid(page, "auth-dialog")).to_be_hidden()
        await expect(tid(page, "conn-state")).to_have_attribute("data-state", "live")
        await expect(tid(page, "token-button")).to_have_text("Token: ops")
        await http.push_many("guarded", [{"n": n} for n in range(2)])
        await value_is(page, "queue-guarded-ready", 2, timeout=FEED_DEADLINE_MS + 2_000)

        # The token is remembered: a reload goes straight to live.
        await page.reload()
        await expect(tid(page, "conn-state")).to_have_attribute("data-state", "live")
        await value_is(page, "queue-guarded-ready", 2)
        await expect(tid(page, "auth-dialog")).to_be_hidden()
