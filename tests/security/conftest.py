"""Fixtures the adversarial tests share: one pristine artifact and one worker harness per module."""
from __future__ import annotations

import pytest

from .attacker import Pristine, pristine_artifact
from .harness import Harness


@pytest.fixture(scope="module")
def pristine() -> Pristine:
    return pristine_artifact()


@pytest.fixture(scope="module")
def harness():
    harness = Harness(timeout_s=30.0)
    yield harness
    harness.close()
