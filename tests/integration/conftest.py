"""Every integration test runs its services with auth on (tests/keys.py)."""

from __future__ import annotations

import os

import pytest

from tests.keys import auth_env


@pytest.fixture(scope="session", autouse=True)
def auth_on():
    saved = {name: os.environ.get(name) for name in auth_env()}
    os.environ.update(auth_env())
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
