"""The toy models are tiny: one thread avoids thread-synchronisation overhead on a busy machine."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
