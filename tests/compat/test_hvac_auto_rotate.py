"""Automatic rotation through python3-hvac (0.11.2 has no auto_rotate_period argument, so its
generic Client.write sets it, as users of that version do): Transit's auto_rotate_period on create and config
(seconds or durations, 0 off, the minimum enforced), a key really rotating in the background
under -dev (where the minimum is 10 s), on a mounted engine too, and Key Protect's rotation
policy being the same setting."""

import base64
import os
import sys
import time

import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import unique_name  # noqa: E402

import hvac  # noqa: E402
from hvac import exceptions as hvac_exc  # noqa: E402


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


@pytest.fixture(scope="module")
def client(server):
    c = hvac.Client(url=server.url, token=server.token)
    yield c
    c.adapter.close()


@pytest.fixture(scope="module")
def transit(client):
    return client.secrets.transit


def create(client, name, mount="transit", **params):
    client.write("%s/keys/%s" % (mount, name), **params)


def configure(client, name, **params):
    client.write("transit/keys/%s/config" % name, **params)


def latest(transit, name, **kw):
    return transit.read_key(name=name, **kw)["data"]["latest_version"]


def wait_for_version(transit, name, version, timeout=40, **kw):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if latest(transit, name, **kw) >= version:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("given,seconds", [("3600", 3600), ("24h", 86400), ("1h30m", 5400), ("2d", 172800),
                                           (7200, 7200), ("0", 0)])
def test_periods_are_read_back_in_seconds(client, transit, given, seconds):
    name = unique_name("ar")
    transit.create_key(name=name)
    configure(client, name, auto_rotate_period=given)
    assert transit.read_key(name=name)["data"]["auto_rotate_period"] == seconds


@pytest.mark.parametrize("given", ["5s", "soon", "10x", "-1", "1.5h"])
def test_bad_or_too_short_periods_are_400_and_change_nothing(client, transit, given):
    name = unique_name("ar")
    create(client, name, auto_rotate_period="2h")
    with pytest.raises(hvac_exc.InvalidRequest, match="auto_rotate_period"):
        configure(client, name, auto_rotate_period=given)
    assert transit.read_key(name=name)["data"]["auto_rotate_period"] == 7200


def test_a_due_key_rotates_by_itself_and_zero_stops_it(client, transit):
    name = unique_name("ar")
    create(client, name, auto_rotate_period="10s")
    assert transit.read_key(name=name)["data"]["auto_rotate_period"] == 10
    ct = transit.encrypt_data(name=name, plaintext=base64.b64encode(b"before").decode())["data"]["ciphertext"]
    assert wait_for_version(transit, name, 2), "the key did not rotate within 40 s of a 10 s period"
    # Old ciphertext still opens; new encryptions use the new version.
    assert transit.decrypt_data(name=name, ciphertext=ct)["data"]["plaintext"] == base64.b64encode(b"before").decode()
    new_ct = transit.encrypt_data(name=name, plaintext=base64.b64encode(b"x").decode())["data"]["ciphertext"]
    assert not new_ct.startswith("vault:v1:")
    configure(client, name, auto_rotate_period=0)
    settled = latest(transit, name)
    time.sleep(12)
    assert latest(transit, name) == settled


def test_keys_of_a_mounted_engine_rotate_too(client, transit):
    mount = unique_name("arm")
    client.sys.enable_secrets_engine(backend_type="transit", path=mount)
    name = unique_name("ar")
    create(client, name, mount=mount, auto_rotate_period=10)
    assert wait_for_version(transit, name, 2, mount_point=mount)
    client.sys.disable_secrets_engine(path=mount)


def test_key_protect_rotation_policy_is_the_same_setting(server, client, transit):
    name = unique_name("ar")
    transit.create_key(name=name)
    headers = {"Authorization": "Bearer " + server.token}
    body = {"metadata": {"collectionType": "application/vnd.ibm.kms.policy+json", "collectionTotal": 1},
            "resources": [{"type": "application/vnd.ibm.kms.policy+json", "rotation": {"interval_month": 2}}]}
    r = requests.put(server.url + "/kms/api/v2/keys/%s/policies" % name, json=body, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert transit.read_key(name=name)["data"]["auto_rotate_period"] == 2 * 30 * 86400
    configure(client, name, auto_rotate_period="24h")
    got = requests.get(server.url + "/kms/api/v2/keys/%s/policies" % name, headers=headers, timeout=10).json()
    assert got["resources"][0]["rotation"]["interval_seconds"] == 86400


def test_rotation_period_holds_across_a_restart():
    srv = tl.DevServer()
    srv.start()
    try:
        c = hvac.Client(url=srv.url, token=srv.token)
        name = unique_name("arr")
        c.write("transit/keys/%s" % name, auto_rotate_period="10s")
        assert srv.stop() == 0
        time.sleep(11)  # the key falls due while no server runs
        srv.start()
        c = hvac.Client(url=srv.url, token=srv.token)
        assert c.secrets.transit.read_key(name=name)["data"]["auto_rotate_period"] == 10
        assert wait_for_version(c.secrets.transit, name, 2, timeout=20), "not rotated after the restart"
        c.adapter.close()
    finally:
        srv.stop()
        srv.cleanup()
