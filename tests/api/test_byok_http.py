"""HTTP end to end: the Confluent-style BYOK key registry at /byok/v1/keys (docs/api/byok.md),
against `p11kms server -config FILE` with a real SoftHSM token and SQLite store.

Black-box: only HTTP requests, status codes, headers and bodies (and, for the 500, an edit of
the SQLite file the way a corrupted store would look).
"""

import base64
import os
import re
import sqlite3
import sys
import threading
import time
import urllib.parse

import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integration"))
import p11kms_testlib as tl  # noqa: E402
import configured_server as cs  # noqa: E402

BASE = "/byok/v1/keys"
ID_RE = re.compile(r"^cck-[a-z0-9]{8,}$")
RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
ARN = "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
AZURE = {"kind": "AzureKey", "key_id": "https://vault-name.vault.azure.net/keys/key-name",
         "key_vault_id": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/"
                         "Microsoft.KeyVault/vaults/vault-name",
         "tenant_id": "00000000-0000-0000-0000-000000000000"}
GCP = {"kind": "GcpKey", "key_id": "projects/p/locations/us-central1/keyRings/r/cryptoKeys/k/cryptoKeyVersions/3"}
WWW_AUTH = 'Basic error="invalid_key", error_description="The API Key is invalid"'
IN_USE_WINDOW_S = 6
VALIDATION_INTERVAL_S = 2


class Env:
    pass


def write_config(root, port, label, tokens, extra):
    lines = "".join(tokens)
    with open(os.path.join(root, "p11kms.yaml"), "w") as f:
        f.write("listen:\n  address: 127.0.0.1:%d\n"
                "hsm:\n  module: %s\n  token_label: %s\n  pin_file: user.pin\n"
                "store:\n  path: p11kms.db\n"
                "auth:\n  tokens:\n%s%s" % (port, cs.SOFTHSM_MODULE, label, lines, extra))
    return os.path.join(root, "p11kms.yaml")


def start_server(prefix, extra, readers=True):
    e = Env()
    e.tmp = cs.make_tmpdir(prefix)
    e.token = cs.SoftToken(e.tmp).init()
    e.token.write_pin_file(os.path.join(e.tmp, "user.pin"))
    e.admin = "adm-" + os.urandom(8).hex()
    e.reader = "rdr-" + os.urandom(8).hex()
    tokens = ['    - {name: admin, token_sha256: %s, policies: [root], namespaces: ["*"]}\n' % cs.token_hash(e.admin)]
    if readers:
        tokens.append("    - {name: reader, token_sha256: %s, policies: [byok-reader], namespaces: [root]}\n"
                      % cs.token_hash(e.reader))
        extra = "policies:\n  byok-reader:\n    - path: byok/keys/+\n      capabilities: [read]\n" + extra
    port = cs.free_port()
    cfg = write_config(e.tmp, port, e.token.label, tokens, extra)
    e.server = cs.ConfiguredServer(cfg, e.token.env(), token=e.admin, port=port)
    e.server.start()
    e.url = e.server.url
    e.db = os.path.join(e.tmp, "p11kms.db")
    return e


@pytest.fixture(scope="module")
def env():
    e = start_server("p11kms-byok-", "byok:\n  region: test-region\n  validation_interval: %ds\n"
                     "  in_use_window: %ds\n  max_keys: 400\n" % (VALIDATION_INTERVAL_S, IN_USE_WINDOW_S))
    try:
        yield e
    finally:
        e.server.stop()
        cs.remove_tmpdir(e.tmp)


@pytest.fixture(autouse=True)
def _log_on_failure(request, env):
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        print("--- server log tail ---\n" + env.server.log_tail(60))


def req(env, method, path, token=None, ns=None, auth="bearer", **kw):
    headers = kw.pop("headers", {}) or {}
    token = token or env.admin
    if auth == "bearer":
        headers["Authorization"] = "Bearer " + token
    elif auth == "basic":
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
    if ns:
        headers["X-Vault-Namespace"] = ns
    return requests.request(method, env.url + path, headers=headers, timeout=30, **kw)


def describe(r):
    return "%s %s -> %s %s" % (r.request.method, r.request.path_url, r.status_code, r.text[:500])


def assert_error(r, status, code=None, pointer=None, parameter=None):
    assert r.status_code == status, describe(r)
    body = r.json()
    assert set(body) == {"errors"}, describe(r)
    assert isinstance(body["errors"], list) and len(body["errors"]) == 1, describe(r)
    e = body["errors"][0]
    assert set(e) <= {"id", "status", "code", "title", "detail", "source"}, describe(r)
    for f in ("id", "status", "code", "title", "detail"):
        assert isinstance(e[f], str) and e[f], describe(r)
    assert e["status"] == str(status), describe(r)
    if code:
        assert e["code"] == code, describe(r)
    if pointer is not None:
        assert e["source"] == {"pointer": pointer}, describe(r)
    if parameter is not None:
        assert e["source"] == {"parameter": parameter}, describe(r)
    assert r.headers.get("X-Request-Id"), describe(r)
    return e


def create(env, key, display_name=None, ns=None, status=201):
    body = {"key": key}
    if display_name is not None:
        body["display_name"] = display_name
    r = req(env, "POST", BASE, json=body, ns=ns)
    assert r.status_code == status, describe(r)
    return r.json()


def kms_key(env, ns=None, **extra):
    name = "rk-" + os.urandom(5).hex()
    res = {"type": "application/vnd.ibm.kms.key+json", "name": name}
    res.update(extra)
    r = req(env, "POST", "/kms/api/v2/keys", ns=ns, json={"metadata": {"collectionType": res["type"],
                                                                          "collectionTotal": 1},
                                                            "resources": [res]})
    assert r.status_code == 201, describe(r)
    return r.json()["resources"][0]


def get(env, kid, ns=None, validate=False):
    r = req(env, "GET", BASE + "/" + kid + ("?validate=true" if validate else ""), ns=ns)
    assert r.status_code == 200, describe(r)
    return r.json()


def list_all(env, ns=None, page_size=10, **filters):
    """Follows `next` links; returns (ids in order, total_size of each page, pages)."""
    params = dict(filters)
    params["page_size"] = page_size
    url = env.url + BASE + "?" + urllib.parse.urlencode(params)
    ids, totals, pages = [], [], 0
    while url:
        headers = {"Authorization": "Bearer " + env.admin}
        if ns:
            headers["X-Vault-Namespace"] = ns
        r = requests.get(url, headers=headers, timeout=30)
        assert r.status_code == 200, describe(r)
        body = r.json()
        assert body["api_version"] == "byok/v1" and body["kind"] == "KeyList", describe(r)
        assert len(body["data"]) <= page_size
        ids += [k["id"] for k in body["data"]]
        totals.append(body["metadata"]["total_size"])
        url = body["metadata"].get("next")
        pages += 1
        assert pages < 1000
    return ids, totals, pages


def fresh_ns():
    return "ns-" + os.urandom(4).hex()


# -- routes ------------------------------------------------------------------------------------

def test_create_p11kms_key_validates_at_once_and_shows_confluent_shape(env):
    root = kms_key(env)
    k = create(env, {"kind": "P11kmsKey", "key_id": root["name"]}, display_name="Billing root")
    assert ID_RE.match(k["id"]), k
    assert k["api_version"] == "byok/v1" and k["kind"] == "Key"
    assert k["key"] == {"kind": "P11kmsKey", "key_id": root["name"]}
    assert k["display_name"] == "Billing root"
    assert k["provider"] == "P11KMS"
    assert k["state"] == "AVAILABLE"
    assert k["validation"]["phase"] == "VALID", k
    assert k["validation"]["region"] == "test-region"
    assert RFC3339_RE.match(k["validation"]["since"])
    m = k["metadata"]
    assert m["self"] == env.url + BASE + "/" + k["id"]
    assert m["resource_name"] == "crn://p11kms/namespace=root/key=" + k["id"]
    assert RFC3339_RE.match(m["created_at"]) and RFC3339_RE.match(m["updated_at"])
    assert "deleted_at" not in m
    # By id works as well as by name.
    k2 = create(env, {"kind": "P11kmsKey", "key_id": root["id"]})
    assert k2["validation"]["phase"] == "VALID" and k2["id"] != k["id"]


def test_external_kinds_are_kept_as_references_and_stay_initializing(env):
    for key, provider in (({"kind": "AwsKey", "key_arn": ARN}, "AWS"), (AZURE, "Azure"), (GCP, "GCP")):
        k = create(env, key)
        assert k["provider"] == provider
        assert k["validation"]["phase"] == "INITIALIZING"
        assert k["validation"]["message"] == "no validator configured for provider " + provider
        assert "region" not in k["validation"]
        assert k["state"] == "AVAILABLE"
        for f, v in key.items():
            assert k["key"][f] == v
        if provider == "AWS":
            assert k["key"]["roles"] == []
        # ?validate=true never fakes a validation.
        again = get(env, k["id"], validate=True)
        assert again["validation"]["phase"] == "INITIALIZING"
        assert again["validation"]["since"] == k["validation"]["since"]


@pytest.mark.parametrize("body,pointer", [
    ({"key": {"kind": "AwsKey", "key_arn": "arn:aws:kms:us-west-2:1:key/x"}}, "/key/key_arn"),
    ({"key": {"kind": "AwsKey", "key_arn": "arn:aws:s3:::bucket"}}, "/key/key_arn"),
    ({"key": dict(AZURE, key_id="https://vault-name.vault.azure.net/keys/key-name/0123456789abcdef")}, "/key/key_id"),
    ({"key": dict(AZURE, tenant_id="not-a-uuid")}, "/key/tenant_id"),
    ({"key": dict(AZURE, key_vault_id="/subscriptions/x/vaults/v")}, "/key/key_vault_id"),
    ({"key": {"kind": "GcpKey", "key_id": "projects/p/keyRings/r/cryptoKeys/k"}}, "/key/key_id"),
    ({"key": {"kind": "AwsKey"}}, "/key/key_arn"),
    ({"key": {"kind": "OracleKey"}}, "/key/kind"),
    ({"key": {"key_arn": ARN}}, "/key/kind"),
    ({"key": {"kind": "AwsKey", "key_arn": ARN, "roles": ["arn:aws:iam::1:role/x"]}}, "/key/roles"),
    ({"key": dict(AZURE, application_id="x")}, "/key/application_id"),
    ({"key": dict(GCP, security_group="g@x")}, "/key/security_group"),
    ({"key": {"kind": "P11kmsKey", "key_id": "no-such-key"}}, "/key/key_id"),
    ({"key": {"kind": "AwsKey", "key_arn": ARN}, "provider": "AWS"}, "/provider"),
    ({"key": {"kind": "AwsKey", "key_arn": ARN}, "state": "IN_USE"}, "/state"),
    ({"key": {"kind": "AwsKey", "key_arn": ARN}, "id": "cck-mine"}, "/id"),
    ({"key": {"kind": "AwsKey", "key_arn": ARN}, "colour": "red"}, "/colour"),
    ({"display_name": "x"}, "/key"),
    ({"key": {"kind": "AwsKey", "key_arn": ARN}, "display_name": 7}, "/display_name"),
])
def test_create_refuses_bad_bodies_naming_the_field(env, body, pointer):
    assert_error(req(env, "POST", BASE, json=body), 400, pointer=pointer)


def test_create_refuses_keys_that_are_not_root_keys(env):
    standard = kms_key(env, extractable=True)
    assert_error(req(env, "POST", BASE, json={"key": {"kind": "P11kmsKey", "key_id": standard["id"]}}),
                 400, pointer="/key/key_id")
    r = req(env, "POST", "/v1/transit/keys/exp-" + os.urandom(4).hex(), json={"exportable": True},
            headers={"X-Vault-Token": env.admin})
    assert r.status_code in (200, 204), describe(r)
    name = r.request.path_url.rsplit("/", 1)[1]
    assert_error(req(env, "POST", BASE, json={"key": {"kind": "P11kmsKey", "key_id": name}}), 400, pointer="/key/key_id")
    # Another namespace's key is not found in this one.
    other = kms_key(env, ns="team-x")
    assert_error(req(env, "POST", BASE, json={"key": {"kind": "P11kmsKey", "key_id": other["id"]}}),
                 400, pointer="/key/key_id")


def test_get_patch_delete_and_ids_never_reused(env):
    k = create(env, {"kind": "AwsKey", "key_arn": ARN}, display_name="old")
    assert get(env, k["id"])["display_name"] == "old"
    time.sleep(1.1)
    r = req(env, "PATCH", BASE + "/" + k["id"], json={"display_name": "new name"})
    assert r.status_code == 200, describe(r)
    assert r.json()["display_name"] == "new name"
    assert r.json()["metadata"]["updated_at"] > k["metadata"]["updated_at"]
    assert r.json()["metadata"]["created_at"] == k["metadata"]["created_at"]
    assert get(env, k["id"])["display_name"] == "new name"
    assert_error(req(env, "PATCH", BASE + "/" + k["id"], json={"key": {"kind": "AwsKey", "key_arn": ARN}}),
                 400, code="immutable_field", pointer="/key")
    assert_error(req(env, "PATCH", BASE + "/" + k["id"], json={"provider": "GCP"}), 400, pointer="/provider")
    assert_error(req(env, "PATCH", BASE + "/" + k["id"], json={"validation": {}}), 400, pointer="/validation")
    assert_error(req(env, "PATCH", BASE + "/cck-doesnotexist", json={"display_name": "x"}), 404)
    r = req(env, "DELETE", BASE + "/" + k["id"])
    assert r.status_code == 204 and r.text == "", describe(r)
    assert_error(req(env, "GET", BASE + "/" + k["id"]), 404)
    assert_error(req(env, "DELETE", BASE + "/" + k["id"]), 404)
    assert_error(req(env, "PATCH", BASE + "/" + k["id"], json={"display_name": "x"}), 404)
    assert k["id"] not in list_all(env, page_size=100)[0]
    # The deleted id stays taken in the store.
    db = sqlite3.connect(env.db)
    try:
        row = db.execute("SELECT deleted_at FROM byok_keys WHERE id = ?", (k["id"],)).fetchone()
    finally:
        db.close()
    assert row and row[0] > 0


def test_namespaces_are_separate(env):
    ns = fresh_ns()
    k = create(env, {"kind": "AwsKey", "key_arn": ARN}, ns=ns)
    assert k["metadata"]["resource_name"] == "crn://p11kms/namespace=%s/key=%s" % (ns, k["id"])
    assert_error(req(env, "GET", BASE + "/" + k["id"]), 404)
    assert get(env, k["id"], ns=ns)["id"] == k["id"]
    assert list_all(env, ns=ns)[0] == [k["id"]]


# -- filters -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def filtered(env):
    """A namespace with one key of each provider and phase, for the filter tests."""
    ns = fresh_ns()
    valid_root = kms_key(env, ns=ns)
    broken_root = kms_key(env, ns=ns)
    keys = {
        "aws": create(env, {"kind": "AwsKey", "key_arn": ARN}, display_name="Billing Cluster AWS", ns=ns),
        "azure": create(env, AZURE, display_name="billing azure", ns=ns),
        "gcp": create(env, GCP, display_name="Analytics GCP", ns=ns),
        "valid": create(env, {"kind": "P11kmsKey", "key_id": valid_root["name"]}, display_name="p11 valid", ns=ns),
        "invalid": create(env, {"kind": "P11kmsKey", "key_id": broken_root["name"]}, display_name="p11 BILLING", ns=ns),
    }
    r = req(env, "POST", "/kms/api/v2/keys/%s/actions/disable" % broken_root["id"], ns=ns)
    assert r.status_code == 204, describe(r)
    assert get(env, keys["invalid"]["id"], ns=ns, validate=True)["validation"]["phase"] == "INVALID"
    r = req(env, "POST", "/kms/api/v2/keys/%s/actions/wrap" % valid_root["id"], ns=ns, json={})
    assert r.status_code == 200, describe(r)   # a client's operation: IN_USE
    return ns, {n: k["id"] for n, k in keys.items()}


@pytest.mark.parametrize("filters,expected", [
    ({"display_name": "billing"}, {"aws", "azure", "invalid"}),
    ({"display_name": "CLUSTER aws"}, {"aws"}),
    ({"provider": "AWS"}, {"aws"}),
    ({"provider": "Azure"}, {"azure"}),
    ({"provider": "GCP"}, {"gcp"}),
    ({"provider": "P11KMS"}, {"valid", "invalid"}),
    ({"state": "IN_USE"}, {"valid"}),
    ({"state": "AVAILABLE"}, {"aws", "azure", "gcp", "invalid"}),
    ({"validation_phase": "INITIALIZING"}, {"aws", "azure", "gcp"}),
    ({"validation_phase": "VALID"}, {"valid"}),
    ({"validation_phase": "INVALID"}, {"invalid"}),
    ({"validation_region": "test-region"}, {"valid", "invalid"}),
    ({"validation_region": "us-west-2"}, set()),
    ({"key": "vault-name"}, {"azure"}),
    ({"key": "111122223333"}, {"aws"}),
    ({"key": "keyRings/r"}, {"gcp"}),
    # combined
    ({"display_name": "billing", "provider": "P11KMS"}, {"invalid"}),
    ({"provider": "P11KMS", "state": "AVAILABLE", "validation_phase": "INVALID"}, {"invalid"}),
    ({"display_name": "p11", "validation_region": "test-region", "state": "IN_USE"}, {"valid"}),
    ({"key": "vault-name", "provider": "AWS"}, set()),
])
def test_filters_alone_and_combined(env, filtered, filters, expected):
    ns, ids = filtered
    for page_size in (1, 100):
        got, totals, _ = list_all(env, ns=ns, page_size=page_size, **filters)
        assert got == sorted(got)
        assert set(got) == {ids[n] for n in expected}, (filters, got)
        assert all(t == len(expected) for t in totals)


@pytest.mark.parametrize("query,parameter", [
    ("page_size=0", "page_size"), ("page_size=101", "page_size"), ("page_size=ten", "page_size"),
    ("page_size=-1", "page_size"), ("provider=aws", "provider"), ("state=USED", "state"),
    ("validation_phase=valid", "validation_phase"), ("colour=red", "colour"),
    ("page_token=" + "A" * 256, "page_token"),
])
def test_bad_query_parameters_name_the_parameter(env, query, parameter):
    assert_error(req(env, "GET", BASE + "?" + query), 400, parameter=parameter)


# -- paging ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many(env):
    ns = fresh_ns()
    ids = [create(env, {"kind": "AwsKey", "key_arn": ARN}, display_name="k%03d" % i, ns=ns)["id"] for i in range(250)]
    return ns, sorted(ids)


@pytest.mark.parametrize("page_size", [1, 7, 10, 100])
def test_paging_sees_every_key_exactly_once(env, many, page_size):
    ns, ids = many
    got, totals, pages = list_all(env, ns=ns, page_size=page_size)
    assert got == ids
    assert len(set(got)) == 250
    assert all(t == 250 for t in totals)
    assert pages == -(-250 // page_size)


def test_default_page_size_links_and_last_page(env, many):
    ns, ids = many
    r = req(env, "GET", BASE, ns=ns, headers={"Host": "byok.example.test:8200"})
    assert r.status_code == 200, describe(r)
    body = r.json()
    assert [k["id"] for k in body["data"]] == ids[:10]
    m = body["metadata"]
    assert m["total_size"] == 250
    assert m["first"] == "http://byok.example.test:8200/byok/v1/keys?page_size=10"
    assert m["next"].startswith("http://byok.example.test:8200/byok/v1/keys?page_size=10&page_token=")
    assert not m.get("prev")
    token = urllib.parse.parse_qs(urllib.parse.urlparse(m["next"]).query)["page_token"][0]
    assert len(token) <= 255 and ids[9] not in token  # opaque
    last = req(env, "GET", m["last"][len("http://byok.example.test:8200"):], ns=ns).json()
    assert [k["id"] for k in last["data"]] == ids[240:]
    assert not last["metadata"].get("next")
    assert last["metadata"]["prev"]
    prev = requests.get(env.url + urllib.parse.urlparse(last["metadata"]["prev"]).path + "?" +
                        urllib.parse.urlparse(last["metadata"]["prev"]).query,
                        headers={"Authorization": "Bearer " + env.admin, "X-Vault-Namespace": ns}, timeout=30).json()
    assert [k["id"] for k in prev["data"]] == ids[230:240]
    assert body["data"][0]["metadata"]["self"] == "http://byok.example.test:8200/byok/v1/keys/" + ids[0]


def test_paging_while_another_client_creates_and_deletes(env):
    ns = fresh_ns()
    start = [create(env, {"kind": "AwsKey", "key_arn": ARN}, ns=ns)["id"] for _ in range(60)]
    survivors = set(start[1::2])           # the other client deletes every other original key
    stop = threading.Event()
    created, deleted, errors = [], [], []

    def other_client():
        to_delete = list(start[0::2])
        while not stop.is_set() and (to_delete or len(created) < 40):
            try:
                if to_delete:
                    r = req(env, "DELETE", BASE + "/" + to_delete.pop(), ns=ns)
                    if r.status_code != 204:
                        errors.append(describe(r))
                    deleted.append(1)
                r = req(env, "POST", BASE, ns=ns, json={"key": {"kind": "AwsKey", "key_arn": ARN}})
                if r.status_code != 201:
                    errors.append(describe(r))
                created.append(r.json()["id"])
            except Exception as ex:  # noqa: BLE001
                errors.append(repr(ex))

    t = threading.Thread(target=other_client, daemon=True)
    t.start()
    try:
        got, _, _ = list_all(env, ns=ns, page_size=3)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors[:3]
    assert len(got) == len(set(got)), "a key was seen twice"
    assert got == sorted(got)
    assert survivors <= set(got), "keys that existed all along were skipped: %s" % (survivors - set(got))
    assert set(got) <= set(start) | set(created)


def test_tampered_forged_and_foreign_page_tokens(env, many):
    ns, ids = many
    r = req(env, "GET", BASE + "?page_size=5", ns=ns)
    token = urllib.parse.parse_qs(urllib.parse.urlparse(r.json()["metadata"]["next"]).query)["page_token"][0]
    ok = req(env, "GET", BASE + "?page_size=5&page_token=" + token, ns=ns)
    assert [k["id"] for k in ok.json()["data"]] == ids[5:10]
    flipped = [token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:] for i in (0, len(token) // 2, len(token) - 1)]
    forged = base64.urlsafe_b64encode(b"\x01" + ids[100].encode() + b"\0" * 16).decode().rstrip("=")
    for bad in flipped + [forged, token + "A", token[:-2], "", "not a token!"]:
        r = req(env, "GET", BASE + "?page_size=5&page_token=" + urllib.parse.quote(bad), ns=ns)
        assert_error(r, 400, parameter="page_token")
    # Another namespace's token (same id space, same query): refused, and never its data.
    other = fresh_ns()
    create(env, {"kind": "AwsKey", "key_arn": ARN}, ns=other)
    assert_error(req(env, "GET", BASE + "?page_size=5&page_token=" + token, ns=other), 400, parameter="page_token")
    # The same token under other filters is refused too.
    assert_error(req(env, "GET", BASE + "?page_size=5&provider=AWS&page_token=" + token, ns=ns), 400,
                 parameter="page_token")


# -- validation and state ------------------------------------------------------------------------

def test_every_validation_transition(env):
    root = kms_key(env)
    k = create(env, {"kind": "P11kmsKey", "key_id": root["id"]})
    assert k["validation"]["phase"] == "VALID"
    since_valid = k["validation"]["since"]
    time.sleep(1.1)
    again = get(env, k["id"], validate=True)
    assert again["validation"]["phase"] == "VALID"
    assert again["validation"]["since"] == since_valid, "since moved without a change"

    assert req(env, "POST", "/kms/api/v2/keys/%s/actions/disable" % root["id"]).status_code == 204
    v = get(env, k["id"], validate=True)["validation"]
    assert v["phase"] == "INVALID" and "disabled" in v["message"], v
    assert v["since"] > since_valid
    assert req(env, "POST", "/kms/api/v2/keys/%s/actions/enable" % root["id"]).status_code == 204
    time.sleep(1.1)
    v = get(env, k["id"], validate=True)["validation"]
    assert v["phase"] == "VALID" and v["region"] == "test-region" and "message" not in v, v

    # The background job (validation_interval 2s) notices a change without ?validate=true.
    assert req(env, "POST", "/kms/api/v2/keys/%s/actions/disable" % root["id"]).status_code == 204
    deadline = time.monotonic() + 10 * VALIDATION_INTERVAL_S
    while get(env, k["id"])["validation"]["phase"] != "INVALID":
        assert time.monotonic() < deadline, "the validation job did not notice the disabled key"
        time.sleep(0.3)
    assert req(env, "POST", "/kms/api/v2/keys/%s/actions/enable" % root["id"]).status_code == 204
    assert get(env, k["id"], validate=True)["validation"]["phase"] == "VALID"

    # Deleted: INVALID, and it never comes back.
    assert req(env, "DELETE", "/kms/api/v2/keys/" + root["id"]).status_code == 204
    v = get(env, k["id"], validate=True)["validation"]
    assert v["phase"] == "INVALID" and "deleted" in v["message"], v
    # Expired: INVALID naming it.
    exp_root = kms_key(env, expirationDate=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3)))
    e = create(env, {"kind": "P11kmsKey", "key_id": exp_root["id"]})
    assert e["validation"]["phase"] == "VALID"
    time.sleep(4)
    v = get(env, e["id"], validate=True)["validation"]
    assert v["phase"] == "INVALID" and "expired" in v["message"], v


def test_validation_itself_does_not_make_a_key_in_use(env):
    root = kms_key(env)
    k = create(env, {"kind": "P11kmsKey", "key_id": root["id"]})
    for _ in range(3):
        assert get(env, k["id"], validate=True)["state"] == "AVAILABLE"
    time.sleep(VALIDATION_INTERVAL_S + 1)   # the job validated it too
    assert get(env, k["id"])["state"] == "AVAILABLE"


@pytest.mark.parametrize("how", ["kms-wrap", "transit-encrypt"])
def test_in_use_after_a_client_operation_blocks_delete(env, how):
    if how == "kms-wrap":
        root = kms_key(env)
        ref = root["id"]
        op = lambda: req(env, "POST", "/kms/api/v2/keys/%s/actions/wrap" % root["id"], json={})  # noqa: E731
    else:
        name = "tr-" + os.urandom(4).hex()
        r = requests.post(env.url + "/v1/transit/keys/" + name, json={}, headers={"X-Vault-Token": env.admin})
        assert r.status_code in (200, 204), r.text
        ref = name
        op = lambda: requests.post(env.url + "/v1/transit/encrypt/" + name,  # noqa: E731
                                   json={"plaintext": base64.b64encode(b"hi").decode()},
                                   headers={"X-Vault-Token": env.admin})
    k = create(env, {"kind": "P11kmsKey", "key_id": ref})
    assert k["state"] == "AVAILABLE"
    assert_in_filter = lambda state: k["id"] in list_all(env, page_size=100, state=state)[0]  # noqa: E731
    assert assert_in_filter("AVAILABLE")
    r = op()
    assert r.status_code == 200, r.text
    assert get(env, k["id"])["state"] == "IN_USE"
    assert assert_in_filter("IN_USE") and not assert_in_filter("AVAILABLE")
    assert_error(req(env, "DELETE", BASE + "/" + k["id"]), 409, code="key_in_use")
    assert get(env, k["id"])["id"] == k["id"]      # still there
    time.sleep(IN_USE_WINDOW_S + 1)               # the window passes
    assert get(env, k["id"])["state"] == "AVAILABLE"
    assert req(env, "DELETE", BASE + "/" + k["id"]).status_code == 204


def test_quota_is_a_409_quota_exceeded(env):
    ns = fresh_ns()
    e2 = start_server("p11kms-byok-quota-", "byok:\n  max_keys: 2\n", readers=False)
    try:
        for _ in range(2):
            assert req(e2, "POST", BASE, ns=ns, json={"key": {"kind": "AwsKey", "key_arn": ARN}}).status_code == 201
        assert_error(req(e2, "POST", BASE, ns=ns, json={"key": {"kind": "AwsKey", "key_arn": ARN}}), 409,
                     code="quota_exceeded")
        assert req(e2, "POST", BASE, json={"key": {"kind": "AwsKey", "key_arn": ARN}}).status_code == 201  # per namespace
        # 429 with the shared pipeline's headers is tested on rate_limited below; 500 here: a corrupt row.
        ids = list_all(e2, ns=ns)[0]
        db = sqlite3.connect(e2.db)
        db.execute("UPDATE byok_keys SET key_json = 'not json' WHERE id = ?", (ids[0],))
        db.commit()
        db.close()
        e = assert_error(req(e2, "GET", BASE + "/" + ids[0], ns=ns), 500)
        assert "internal" in e["detail"] and "not json" not in e["detail"]
        # 503: the store cannot serve the registry.
        db = sqlite3.connect(e2.db)
        db.execute("ALTER TABLE byok_keys RENAME TO byok_keys_away")
        db.commit()
        db.close()
        e = assert_error(req(e2, "GET", BASE, ns=ns), 503)
        assert "unavailable" in e["detail"]
    finally:
        e2.server.stop()
        cs.remove_tmpdir(e2.tmp)


# -- auth, headers, errors ---------------------------------------------------------------------

def test_basic_and_bearer_auth(env):
    assert req(env, "GET", BASE, auth="bearer").status_code == 200
    assert req(env, "GET", BASE, token="admin:" + env.admin, auth="basic").status_code == 200
    assert req(env, "GET", BASE, headers={"X-Vault-Token": env.admin}, auth=None).status_code == 200
    for token, auth in (("reader:" + env.admin, "basic"),   # a name that is not the token's
                        ("admin:" + env.reader, "basic"),
                        ("admin:wrong", "basic"),
                        ("admin" + env.admin, "basic"),     # no colon
                        ("wrong", "bearer")):
        r = req(env, "GET", BASE, token=token, auth=auth)
        assert_error(r, 401, code="user_unauthenticated")
        assert r.headers.get("WWW-Authenticate") == WWW_AUTH
    r = requests.get(env.url + BASE, timeout=30)
    assert_error(r, 401)
    assert r.headers.get("WWW-Authenticate") == WWW_AUTH
    r = requests.get(env.url + BASE, headers={"Authorization": "Basic %%%"}, timeout=30)
    assert_error(r, 401)


def test_policy_paths_and_403(env):
    k = create(env, {"kind": "AwsKey", "key_arn": ARN})
    r = req(env, "GET", BASE + "/" + k["id"], token="reader:" + env.reader, auth="basic")
    assert r.status_code == 200, describe(r)   # read on byok/keys/+
    for method, path, body in (("GET", BASE, None), ("POST", BASE, {"key": {"kind": "AwsKey", "key_arn": ARN}}),
                               ("PATCH", BASE + "/" + k["id"], {"display_name": "x"}),
                               ("DELETE", BASE + "/" + k["id"], None)):
        assert_error(req(env, method, path, token=env.reader, json=body), 403, code="user_unauthorized")
    assert_error(req(env, "GET", BASE + "/" + k["id"], token=env.reader, ns="team-x"), 403)
    assert get(env, k["id"])["display_name"] == ""   # nothing changed


def test_error_shape_404_405_and_bad_json(env):
    assert_error(req(env, "GET", BASE + "/cck-nope"), 404, code="not_found")
    assert_error(req(env, "PUT", BASE), 405)
    assert_error(req(env, "GET", "/byok/v1/other"), 404)
    r = req(env, "POST", BASE, data="{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 400)
    assert_error(req(env, "POST", BASE, json=[1, 2]), 400)
    assert_error(req(env, "GET", BASE + "/cck-nope?validate=maybe"), 400, parameter="validate")


def test_rate_limit_headers_and_429(env):
    e2 = start_server("p11kms-byok-rl-", "limits:\n  rate_limit:\n    requests_per_second: 1\n    burst: 3\n",
                      readers=False)
    try:
        seen = []
        for _ in range(6):
            r = req(e2, "GET", BASE)
            seen.append(r)
            for h in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "X-Request-Id"):
                assert r.headers.get(h) is not None, (h, describe(r))
            assert r.headers["X-RateLimit-Limit"] == "3"
            assert 0 <= int(r.headers["X-RateLimit-Reset"]) <= 60   # relative seconds
        limited = [r for r in seen if r.status_code == 429]
        assert limited, [r.status_code for r in seen]
        assert_error(limited[0], 429)
        assert int(limited[0].headers["Retry-After"]) >= 1
        assert seen[0].status_code == 200
    finally:
        e2.server.stop()
        cs.remove_tmpdir(e2.tmp)


def test_request_id_is_echoed(env):
    r = req(env, "GET", BASE, headers={"X-Request-Id": "byok-test-123"})
    assert r.headers["X-Request-Id"] == "byok-test-123"
