"""The JWKS of a key set is public by default; `jwks: {public: false}` turns that off, so the
document then needs a token like every other route (docs/api/kong.md)."""

import os
import secrets
import sys

import pytest
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import configured_server as cs  # noqa: E402

READER = "hvs." + secrets.token_hex(12)


@pytest.fixture(scope="module")
def server():
    yield from cs.serve_with_tokens("p11kms-jwks-private-", [("admin", READER, "[root]", "[root]")],
                                    "jwks:\n  public: false\n")


def get(server, path, token=None):
    headers = {"X-Vault-Token": token} if token else {}
    return requests.get(server.url + path, headers=headers, timeout=30)


def test_jwks_needs_a_token_when_not_public(server):
    r = server.request("POST", "/key-sets", json={"name": "private-set"})
    assert r.status_code == 201, r.text
    anonymous = get(server, "/key-sets/private-set/jwks")
    assert anonymous.status_code == 401, anonymous.text
    assert "keys" not in anonymous.json() and anonymous.json().get("message"), anonymous.text
    # Not a way to learn which sets exist either: an unknown set answers the same.
    assert get(server, "/key-sets/no-such-set/jwks").status_code == 401
    r = get(server, "/key-sets/private-set/jwks", token=READER)
    assert r.status_code == 200, r.text
    assert r.json() == {"keys": []}
