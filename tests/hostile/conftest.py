"""Fixtures for the hostile-input tests, reused from the operating, replication and subscriber
tests."""

from __future__ import annotations

from tests.operate.conftest import emulators, make_stack  # noqa: F401 - fixtures
from tests.replication.conftest import make_cluster  # noqa: F401 - fixture
from tests.subscriber.conftest import clock, raw_server  # noqa: F401 - fixtures
