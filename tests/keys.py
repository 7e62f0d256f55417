"""API keys the tests' services run with (auth on): made fresh per test session.

tests/integration/conftest.py puts them in the environment for the whole session: RECSYS_AUTH_KEYS
(the servers' keys: every service the tests start, in-process or as a process, has auth on),
RECSYS_API_KEY (what a client sends when it is given no key: the test shop's) and
RECSYS_FEEDBACK_API_KEY (the gateway's own key for LogServed / GetBlendWeights). Code that calls
a generated stub directly makes its channel with rpc.clients.channel / aio_channel.
"""

from __future__ import annotations

from rpc.auth import ADMIN, EVENTS, INTERNAL, KEYS_ENV, RECOMMEND, key_line, new_key
from rpc.clients import API_KEY_ENV

SHOP, GATEWAY, ADMIN_NAME = "test-shop", "test-gateway", "test-admin"
SHOP_KEY, GATEWAY_KEY, ADMIN_KEY = new_key(), new_key(), new_key()
KEY_LINES = ";".join((key_line(SHOP, (RECOMMEND, EVENTS), SHOP_KEY), key_line(GATEWAY, (INTERNAL,), GATEWAY_KEY),
                      key_line(ADMIN_NAME, (ADMIN,), ADMIN_KEY)))


def auth_env() -> dict[str, str]:
    return {KEYS_ENV: KEY_LINES, API_KEY_ENV: SHOP_KEY, "RECSYS_FEEDBACK_API_KEY": GATEWAY_KEY}
