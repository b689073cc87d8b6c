"""The harness itself: it must see a crash, a hang, an escaping error and a payload that ran, and recover."""
from __future__ import annotations

import pytest

from .harness import Harness


@pytest.fixture(scope="module")
def harness():
    harness = Harness()
    yield harness
    harness.close()


@pytest.mark.parametrize("name, kind", [("segfault", "crash"), ("hang", "hang"), ("import_payload", "payload_ran"),
                                        ("raise", "other")])
def test_harness_sees_each_failure_and_recovers(harness, name, kind):
    outcome = harness.self_test(name, timeout_s=3.0 if name == "hang" else 60.0)
    assert outcome.kind == kind and not outcome.ok, str(outcome)
    assert harness.self_test("raise", timeout_s=60.0).kind == "other"   # a working worker answers again


def test_a_crash_names_the_signal(harness):
    assert "SIGSEGV" in harness.self_test("segfault", timeout_s=60.0).error
