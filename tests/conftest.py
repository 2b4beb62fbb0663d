"""Fixtures for vigie's integration tests.

- `synapse`: a fresh Synapse (SQLite, plain HTTP on 127.0.0.1, no federation, no rate limits),
  see harness/synapse.py for its API (.port, .base_url, .server_name, .register(), .login()).
- `vigie_factory(server_port, extra_args=None, timeout=30) -> Vigie`: starts `vigie run`
  watching that port and waits until it is ready; `vigie` is the same, started on the
  `synapse` fixture's port. See harness/vigie.py (.scrape(), .labels(), .stop(), .logs()...).
- `synapse_module` / `vigie_module`: the same, shared by the tests of one module.
- `seed`: VIGIE_TEST_SEED (default 1).

Nothing here ever skips: a missing agent binary or a BPF load failure fails the test.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.synapse import Synapse  # noqa: E402
from harness.util import HarnessError  # noqa: E402
from harness.vigie import Vigie  # noqa: E402


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("VIGIE_TEST_SEED", "1"))
    print(f"VIGIE_TEST_SEED={value}")
    return value


@contextmanager
def _running_synapse(tmp_path_factory):
    server = Synapse(tmp_path_factory.mktemp("synapse"))
    error = None
    try:
        server.start(timeout=60)
    except HarnessError as e:
        error = str(e)
    if error is not None:
        server.stop()
        pytest.fail(f"Synapse failed to start: {error}", pytrace=False)
    try:
        yield server
    finally:
        code = server.stop()
        print(f"synapse stopped (exit code {code}); files in {server.workdir}")


@contextmanager
def _vigie_starter(tmp_path_factory):
    started: list[Vigie] = []

    def start(server_port: int, extra_args: list[str] | None = None, timeout: float = 30.0) -> Vigie:
        agent = Vigie(tmp_path_factory.mktemp("vigie"), server_port, extra_args=extra_args)
        started.append(agent)
        error = None
        try:
            agent.start(timeout=timeout)
        except HarnessError as e:
            error = str(e)
        if error is not None:
            agent.stop()
            pytest.fail(f"vigie failed to start: {error}", pytrace=False)
        return agent

    try:
        yield start
    finally:
        for agent in started:
            code = agent.stop()
            print(f"vigie stopped (exit code {code}); files in {agent.workdir}")


@pytest.fixture
def synapse(tmp_path_factory) -> Synapse:
    """A running Synapse; stopped (SIGTERM, then SIGKILL) at teardown."""
    with _running_synapse(tmp_path_factory) as server:
        yield server


@pytest.fixture
def vigie_factory(tmp_path_factory):
    """`start(server_port, extra_args=None, timeout=30) -> Vigie`: a ready agent.

    Fails the test (never skips) when the binary is missing, exits, or is not ready in time.
    Every agent started is stopped at teardown.
    """
    with _vigie_starter(tmp_path_factory) as start:
        yield start


@pytest.fixture
def vigie(synapse, vigie_factory) -> Vigie:
    """The agent, ready, watching the `synapse` fixture's port."""
    return vigie_factory(synapse.port)


@pytest.fixture(scope="module")
def synapse_module(tmp_path_factory) -> Synapse:
    with _running_synapse(tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="module")
def vigie_module(synapse_module, tmp_path_factory) -> Vigie:
    with _vigie_starter(tmp_path_factory) as start:
        yield start(synapse_module.port)


# Cheap self-tests of the harness first, then the acceptance test, then the rest: with -x, a
# broken harness stops the run before the long agent tests.
_MODULE_ORDER = ["test_harness", "test_synapse_harness", "test_capture", "test_secrets", "test_capture_edges"]


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return _MODULE_ORDER.index(name) if name in _MODULE_ORDER else len(_MODULE_ORDER)

    items.sort(key=rank)  # stable: keeps the order within a module
