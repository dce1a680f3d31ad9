"""schemathesis against ``/openapi.json`` of a real broker (``presque serve`` on a real Redis).

Every documented operation gets generated requests, valid and invalid ones; every answer must
be no 5xx, have a documented status, content type and headers, and a body that matches the
schema. The examples are bounded and derandomized, so a run is repeatable and stays short.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.servers import BrokerServer

ROOT = "schemathesis-root-token"
AUTH = {"tokens": [{"name": "root", "token": ROOT, "roles": {"produce": ["*"], "consume": ["*"], "admin": ["*"]}}]}
# Small bounds keep long-polls and batches short; the document states the same bounds.
CONFIG = {
    "auth": AUTH,
    "limits": {"max_wait": 0.2, "max_batch": 20, "max_body": 65536},
    "queues": {"max_lease": 60},
}
EXAMPLES = 10  # per operation and mode: about 35 s in all, mostly spent generating
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def broker(redis_url: str, tmp_path: Path) -> Iterator[BrokerServer]:
    with BrokerServer(tmp_path, redis_url, config=CONFIG) as server:
        yield server


def fuzz(operation: Any, mode: GenerationMode, examples: int) -> list[str]:
    """Run ``examples`` generated cases of one operation; the failures, one line each."""
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report the first example as found
    )
    def run(case: Any) -> None:
        try:
            case.call_and_validate(headers={"Authorization": f"Bearer {ROOT}"}, checks=CHECKS, timeout=10)
        except Exception as exc:  # schemathesis raises a group of every check that failed
            failures.append(f"{case.method} {case.formatted_path} ({mode.value}): {str(exc).strip()[:600]}")

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE  # nothing to make invalid: no parameter, no body
    return failures


@pytest.mark.slow
@pytest.mark.timeout(150)  # typically ~35 s; generous for a loaded CI machine
def test_every_operation_answers_as_documented(broker: BrokerServer) -> None:
    api = schemathesis.openapi.from_url(f"{broker.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures += fuzz(operation, mode, EXAMPLES)
    assert operations >= 25
    assert broker.running
    assert not failures, "\n\n".join(failures[:10]) + f"\n\n{len(failures)} failures"
