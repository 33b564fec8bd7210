"""The reliability suite's short version (`python -m reliability --short`): every part of
`make reliability`, with a few clients and short timeouts, against the real stack as
`make serve` runs it (python -m stack.serve, the default model; its start takes seconds
once the model is exported, and its supervision is what the faults exercise). About a
minute on 2 cores.

Each part's checks must all pass: every client got a whole answer or an OpenAI-shaped
error (a killed adapter's clients excepted: a dead process sends nothing), nothing is
left running, and the stack heals by itself.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from reliability.profile import SHORT
from reliability.stack import ServeStack
from reliability.suite import PARTS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = ServeStack(tmp_path_factory.mktemp("reliability"), env=SHORT.stack_env())
    s.start()
    yield s
    s.stop(SHORT.grace_s + 60)


def _failed(result: dict) -> list[dict]:
    """The guarantees that did not hold (targets in seconds are for the full run's report)."""
    return [c for c in result.get("checks", []) if not c["ok"] and not c["target"]]


@pytest.mark.parametrize("part", list(PARTS))
def test_part(stack, part):
    assert stack.wait_ready(SHORT.recover_timeout_s) is not None, stack.output()[-3000:]

    async def bounded():
        async with asyncio.timeout(SHORT.part_budget_s):
            return await PARTS[part](stack, SHORT)

    result = asyncio.run(bounded())
    failed = _failed(result)
    detail = {k: v for k, v in result.items() if k not in ("checks", "memory_before", "memory_after")}
    assert not failed, f"{failed}\n{json.dumps(detail, default=str)[:3000]}\n{stack.output()[-2000:]}"


def test_make_serve_stops_within_the_grace_period_leaving_nothing(stack):
    stop = stack.stop(SHORT.grace_s + 60)
    assert stop["exit_code"] == 0 and not stop["left_behind"], stop
    assert stop["seconds"] <= SHORT.grace_s + 10, stop
