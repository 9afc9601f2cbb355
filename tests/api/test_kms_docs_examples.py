"""docs/api/kms.md is executable: its ```sh blocks run, in order, in one bash shell against a
real `p11kms server -dev`, with $P11KMS_ADDR and $TOKEN set as a reader would set them. Each
example's HTTP statuses and answer are checked, and so is the documented response shown right
after it (```json: the same structure, field names and JSON types; ```http: the same status
and headers).

When an example is added, removed or reordered in the doc, update EXPECTED below.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import unb64  # noqa: E402

DOC = os.path.join(tl.SOURCE_DIR, "docs", "api", "kms.md")
KEY_TYPE = "application/vnd.ibm.kms.key+json"
ERR_TYPE = "application/vnd.ibm.kms.error+json"
UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
SHELL_VARS = ("KEY_ID", "DEK", "CIPHERTEXT", "WRAPPED")
FENCE_RE = re.compile(r"^```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


# -- the doc, as blocks ----------------------------------------------------------------------

class Example:
    def __init__(self, index, code, sample_lang, sample, line):
        self.index = index
        self.code = code
        self.sample_lang = sample_lang
        self.sample = sample
        self.line = line
        # filled by the run
        self.stdout = ""
        self.stderr = ""
        self.statuses = []
        self.rc = None
        self.vars = {}

    def json(self):
        try:
            return json.loads(self.stdout)
        except ValueError:
            raise AssertionError("example %d (line %d) did not print one JSON document:\n%s\n--- stderr\n%s"
                                 % (self.index, self.line, self.stdout, self.stderr))

    def __repr__(self):
        return "example %d (docs/api/kms.md line %d)" % (self.index, self.line)


def parse_doc(text):
    """The ```sh blocks in order; each with the fenced block right after it as its documented
    response when no heading separates the two."""
    fences = [(m.group(1), m.group(2), m.start(), m.end()) for m in FENCE_RE.finditer(text)]
    out = []
    for i, (lang, body, start, end) in enumerate(fences):
        if lang != "sh":
            continue
        sample_lang = sample = None
        if i + 1 < len(fences):
            nlang, nbody, nstart, _ = fences[i + 1]
            between = text[end:nstart]
            if nlang in ("json", "http") and not re.search(r"^#", between, re.M):
                sample_lang, sample = nlang, nbody
        out.append(Example(len(out), body, sample_lang, sample, text.count("\n", 0, start) + 1))
    return out


def script_for(examples):
    """One bash script running every example in order. curl is wrapped so each call reports
    its HTTP status on stderr (the examples never use -w themselves); markers split the
    output per example."""
    lines = [
        "curl() { command curl -q --max-time 20 -w '%{stderr}@@HTTP %{http_code}@@\\n' \"$@\"; }",
    ]
    for ex in examples:
        lines.append("printf '@@BEGIN %d@@\\n'; printf '@@BEGIN %d@@\\n' >&2" % (ex.index, ex.index))
        lines.append(ex.code.rstrip("\n"))
        lines.append("__rc=$?")
        lines.append("printf '\\n@@END %d rc=%%d@@\\n' \"$__rc\"; printf '@@END %d@@\\n' >&2" % (ex.index, ex.index))
        for v in SHELL_VARS:
            lines.append("printf '@@VAR %s=%%s@@\\n' \"${%s-}\"" % (v, v))
    return "\n".join(lines) + "\n"


def split_run(examples, stdout, stderr):
    for ex in examples:
        m = re.search(r"@@BEGIN %d@@\n(.*?)\n@@END %d rc=(\d+)@@\n((?:@@VAR [A-Z_]+=.*?@@\n)*)"
                      % (ex.index, ex.index), stdout, re.S)
        assert m, "no output markers for %r; stdout:\n%s\nstderr:\n%s" % (ex, stdout[-3000:], stderr[-3000:])
        ex.stdout = m.group(1).strip()
        ex.rc = int(m.group(2))
        ex.vars = dict(re.findall(r"@@VAR ([A-Z_]+)=(.*?)@@", m.group(3)))
        e = re.search(r"@@BEGIN %d@@\n(.*?)@@END %d@@" % (ex.index, ex.index), stderr, re.S)
        assert e, "no stderr markers for %r" % ex
        ex.stderr = e.group(1)
        ex.statuses = [int(s) for s in re.findall(r"@@HTTP (\d{3})@@", ex.stderr)]
        ex.stderr = re.sub(r"@@HTTP \d{3}@@\n?", "", ex.stderr)


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


@pytest.fixture(scope="module")
def doc_text():
    with open(DOC, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def run(server, doc_text):
    examples = parse_doc(doc_text)
    with tempfile.TemporaryDirectory(prefix="p11kms-kms-doc-") as tmp:
        path = os.path.join(tmp, "examples.sh")
        with open(path, "w") as f:
            f.write(script_for(examples))
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8",
               "P11KMS_ADDR": server.url, "TOKEN": server.token}
        out = subprocess.run(["bash", "--noprofile", "--norc", path], cwd=tmp, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             timeout=300)
    stdout = out.stdout.decode("utf-8", "replace")
    stderr = out.stderr.decode("utf-8", "replace")
    split_run(examples, stdout, stderr)
    return examples


# -- documented responses --------------------------------------------------------------------

def shape(value):
    """Structure and JSON types, not values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if value is None:
        return "null"
    return type(value).__name__


def check_sample(ex):
    if ex.sample_lang == "json":
        documented = json.loads(ex.sample)
        assert shape(ex.json()) == shape(documented), (
            "%r: the documented response does not have the real one's structure\n"
            "--- documented\n%s\n--- real\n%s" % (ex, ex.sample, ex.stdout))
    elif ex.sample_lang == "http":
        doc_lines = [l for l in ex.sample.strip().splitlines() if l.strip()]
        real_lines = [l.rstrip("\r") for l in ex.stdout.splitlines() if l.strip()]
        doc_status = doc_lines[0].split()[1]
        assert real_lines[0].split()[1] == doc_status, (ex, real_lines[0])
        real_headers = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip()
                        for l in real_lines[1:] if ":" in l}
        for l in doc_lines[1:]:
            name, value = l.split(":", 1)
            assert real_headers.get(name.lower()) == value.strip(), (ex, l, real_headers)


# -- what each example must do ---------------------------------------------------------------

def key_of(body, status_type=KEY_TYPE):
    assert body["metadata"] == {"collectionType": status_type, "collectionTotal": 1}, body
    assert len(body["resources"]) == 1, body
    return body["resources"][0]


def error_of(ex, status):
    body = ex.json()
    assert body["metadata"] == {"collectionType": ERR_TYPE, "collectionTotal": 1}, body
    reason = body["resources"][0]["reasons"][0]
    assert reason["status"] == status, body
    return body["resources"][0]


def c_setup(ex, state):
    assert ex.stdout == ""


def c_create_root(ex, state):
    k = key_of(ex.json())
    assert k["name"] == "payments-root"
    assert k["description"] == "wraps the payment service DEKs"
    assert k["state"] == 1 and k["extractable"] is False and k["imported"] is False
    assert k["createdBy"] == "root"
    assert UUID4_RE.match(k["id"])
    state["root"] = k


def c_key_id(ex, state):
    assert UUID4_RE.match(ex.stdout), ex.stdout
    assert ex.vars["KEY_ID"] == ex.stdout == state["root"]["id"]


def c_import_root(ex, state):
    k = key_of(ex.json())
    assert k["name"] == "payments-imported"
    assert k["imported"] is True and k["extractable"] is False
    assert "payload" not in k
    state["imported"] = k


def c_create_standard(ex, state):
    k = key_of(ex.json())
    assert k["name"] == "app-config-key"
    assert k["extractable"] is True and k["imported"] is False
    assert "payload" not in k
    state["standard"] = k


def c_read_standard(ex, state):
    k = key_of(ex.json())
    assert k["id"] == state["standard"]["id"]
    assert len(unb64(k["payload"])) == 32


def c_list(ex, state):
    body = ex.json()
    assert body["metadata"] == {"collectionType": KEY_TYPE, "collectionTotal": 2}, body
    assert [k["name"] for k in body["resources"]] == ["payments-root", "payments-imported"]
    assert all("payload" not in k for k in body["resources"])


def c_head(ex, state):
    lines = [l.rstrip("\r") for l in ex.stdout.splitlines()]
    assert re.match(r"^HTTP/1\.[01] 200", lines[0]), lines
    assert "Key-Total: 3" in lines, lines


def c_read_root(ex, state):
    k = key_of(ex.json())
    assert k["id"] == state["root"]["id"] and k["name"] == "payments-root"
    assert "payload" not in k


def c_wrap(ex, state):
    body = ex.json()
    assert set(body) == {"ciphertext", "keyVersion"}, body
    assert body["keyVersion"]["id"] == state["root"]["keyVersion"]["id"]
    assert ex.vars["CIPHERTEXT"] == body["ciphertext"]
    assert len(unb64(ex.vars["DEK"])) == 32
    state["dek"] = ex.vars["DEK"]
    state["v1"] = body["keyVersion"]["id"]


def c_wrap_generated(ex, state):
    body = ex.json()
    assert set(body) == {"ciphertext", "keyVersion", "plaintext"}, body
    assert len(unb64(body["plaintext"])) == 32
    assert body["keyVersion"]["id"] == state["v1"]


def c_unwrap(ex, state):
    body = ex.json()
    assert set(body) == {"plaintext", "keyVersion"}, body
    assert body["plaintext"] == state["dek"]
    assert body["keyVersion"]["id"] == state["v1"]


def c_empty(ex, state):
    assert ex.stdout == "", ex.stdout


def c_unwrap_after_rotation(ex, state):
    body = ex.json()
    assert set(body) == {"plaintext", "keyVersion", "ciphertext", "rewrappedKeyVersion"}, body
    assert body["plaintext"] == state["dek"]
    assert body["keyVersion"]["id"] == state["v1"]
    assert body["rewrappedKeyVersion"]["id"] != state["v1"]
    state["v2"] = body["rewrappedKeyVersion"]["id"]


def c_rewrap(ex, state):
    body = ex.json()
    assert set(body) == {"ciphertext", "keyVersion", "rewrappedKeyVersion"}, body
    assert body["keyVersion"]["id"] == state["v1"]
    assert body["rewrappedKeyVersion"]["id"] == state["v2"]


def c_wrap_suspended(ex, state):
    res = error_of(ex, 409)
    assert "suspended" in res["reasons"][0]["message"].lower() or "disabled" in res["reasons"][0]["message"].lower()


def c_unwrap_path_form(ex, state):
    body = ex.json()
    assert set(body) == {"plaintext", "keyVersion", "ciphertext", "rewrappedKeyVersion"}, body
    assert body["plaintext"] == state["dek"]
    assert body["keyVersion"]["id"] == state["v1"]
    assert body["rewrappedKeyVersion"]["id"] == state["v2"]


def c_metadata(ex, state):
    k = key_of(ex.json())
    assert k["id"] == state["standard"]["id"] and k["name"] == "app-config-key"
    assert k["extractable"] is True
    assert "payload" not in k


def c_versions(ex, state):
    body = ex.json()
    assert body["metadata"] == {"collectionType": "application/vnd.ibm.kms.key_version+json",
                                "collectionTotal": 2}, body
    assert [v["id"] for v in body["resources"]] == [state["v2"], state["v1"]], body
    assert all(re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$", v["creationDate"]) for v in body["resources"])


def c_add_alias(ex, state):
    a = key_of(ex.json(), "application/vnd.ibm.kms.key_alias+json")
    assert a == {"keyId": state["root"]["id"], "alias": "payments-kek", "createdBy": "root",
                 "creationDate": a["creationDate"]}, a


def c_wrap_by_alias(ex, state):
    body = ex.json()
    assert set(body) == {"ciphertext", "keyVersion", "plaintext"}, body
    assert len(unb64(body["plaintext"])) == 32
    assert body["keyVersion"]["id"] == state["v2"]


def c_not_offered(ex, state):
    res = error_of(ex, 501)
    assert res["reasons"][0]["code"] == "NOT_IMPLEMENTED_ERR", res
    assert "import_token" in res["reasons"][0]["message"], res


def c_transit(ex, state):
    body = ex.json()
    assert body["data"]["ciphertext"].startswith("vault:v2:"), body
    assert body["data"]["key_version"] == 2


def c_delete_repr(ex, state):
    k = key_of(ex.json())
    assert k["id"] == state["standard"]["id"]
    assert k["state"] == 5 and k["deleted"] is True
    assert "payload" not in k


def c_unwrap_deleted(ex, state):
    error_of(ex, 410)


def c_no_token(ex, state):
    error_of(ex, 401)


# (needle the block must contain, HTTP statuses of its curl calls, check)
EXPECTED = [
    ("export P11KMS_ADDR", [], c_setup),
    ('"name": "payments-root"', [201], c_create_root),
    ("KEY_ID=$(curl", [200], c_key_id),
    ('"name": "payments-imported"', [201], c_import_root),
    ('"name": "app-config-key"', [201], c_create_standard),
    ("keys/app-config-key\"", [200], c_read_standard),
    ("limit=2&offset=0&state=1,2", [200], c_list),
    ("curl -sS -I", [200], c_head),
    ('keys/$KEY_ID" \\', [200], c_read_root),
    ("action=wrap", [200], c_wrap),
    ("action=wrap", [200], c_wrap_generated),
    ("action=unwrap", [200], c_unwrap),
    ("$KEY_ID?action=rotate", [204], c_empty),
    ("payments-imported?action=rotate", [204], c_empty),
    ("action=unwrap", [200], c_unwrap_after_rotation),
    ("action=rewrap", [200], c_rewrap),
    ("action=disable", [204], c_empty),
    ("action=wrap", [409], c_wrap_suspended),
    ("action=enable", [204], c_empty),
    ("$KEY_ID/actions/unwrap", [200], c_unwrap_path_form),
    ("keys/app-config-key/metadata", [200], c_metadata),
    ("$KEY_ID/versions", [200], c_versions),
    ('-X POST "$P11KMS_ADDR/kms/api/v2/keys/$KEY_ID/aliases/payments-kek"', [201], c_add_alias),
    ("keys/payments-kek/actions/wrap", [200], c_wrap_by_alias),
    ('-X DELETE "$P11KMS_ADDR/kms/api/v2/keys/$KEY_ID/aliases/payments-kek"', [204], c_empty),
    ("/kms/api/v2/import_token", [501], c_not_offered),
    ("/v1/transit/encrypt/payments-root", [200], c_transit),
    ("Prefer: return=representation", [200], c_delete_repr),
    ('-X DELETE "$P11KMS_ADDR/kms/api/v2/keys/$KEY_ID"', [204], c_empty),
    ("action=unwrap", [410], c_unwrap_deleted),
    ("/kms/api/v2/keys\" -H 'bluemix-instance: demo'", [401], c_no_token),
]


def test_the_doc_has_the_expected_examples(doc_text):
    examples = parse_doc(doc_text)
    assert len(examples) == len(EXPECTED), (
        "docs/api/kms.md has %d sh examples, EXPECTED lists %d: update the test with the doc"
        % (len(examples), len(EXPECTED)))
    for ex, (needle, _, _) in zip(examples, EXPECTED):
        assert needle in ex.code, "%r should contain %r:\n%s" % (ex, needle, ex.code)


def test_every_curl_example_is_runnable_as_documented(doc_text):
    for ex in parse_doc(doc_text):
        if "curl" not in ex.code:
            continue
        assert "$P11KMS_ADDR" in ex.code, ex
        assert not re.search(r"(^|\s)(-w|--write-out)(\s|=|$)", ex.code), ex
        if "/kms/api/v2/" in ex.code:
            assert "bluemix-instance: demo" in ex.code, ex
        if "Authorization" in ex.code:
            assert 'Authorization: Bearer $TOKEN' in ex.code, ex


def test_errors_anchor_matches_the_servers_more_info_link(server, doc_text):
    assert re.search(r"^## Errors$", doc_text, re.M)
    r = requests.get(server.url + "/kms/api/v2/keys/nope",
                     headers={"Authorization": "Bearer " + server.token, "bluemix-instance": "demo"},
                     timeout=30)
    assert r.status_code == 404, tl.describe(r)
    more = r.json()["resources"][0]["reasons"][0]["moreInfo"]
    assert more.endswith("docs/api/kms.md#errors"), more


@pytest.fixture(scope="module")
def state():
    return {}


@pytest.mark.parametrize("index", range(len(EXPECTED)), ids=lambda i: "example-%02d" % i)
def test_example(run, state, index):
    assert len(run) == len(EXPECTED), "see test_the_doc_has_the_expected_examples"
    ex = run[index]
    needle, statuses, check = EXPECTED[index]
    assert needle in ex.code, "%r should contain %r" % (ex, needle)
    assert ex.rc == 0, "%r exited %s; stderr:\n%s" % (ex, ex.rc, ex.stderr)
    assert ex.statuses == statuses, "%r: HTTP statuses %s, expected %s\n--- stdout\n%s\n--- stderr\n%s" % (
        ex, ex.statuses, statuses, ex.stdout, ex.stderr)
    assert "curl:" not in ex.stderr, ex.stderr
    check(ex, state)
    if ex.sample_lang:
        check_sample(ex)


def test_after_the_examples_the_server_agrees(run, server):
    """The end state the examples leave, seen over plain HTTP."""
    h = {"Authorization": "Bearer " + server.token, "bluemix-instance": "demo"}
    key_id = run[2].vars["KEY_ID"]
    r = requests.get(server.url + "/kms/api/v2/keys/" + key_id, headers=h, timeout=30)
    assert r.status_code == 200, tl.describe(r)
    k = r.json()["resources"][0]
    assert k["state"] == 5 and k["deleted"] is True
    r = requests.get(server.url + "/kms/api/v2/keys", headers=h, timeout=30)
    assert [k["name"] for k in r.json()["resources"]] == ["payments-imported"], r.text
    # the alias the examples added and removed resolves to nothing
    r = requests.get(server.url + "/kms/api/v2/keys/payments-kek", headers=h, timeout=30)
    assert r.status_code == 404, tl.describe(r)
    r = requests.get(server.url + "/kms/api/v2/keys", headers=h, params={"state": "5"}, timeout=30)
    assert sorted(k["name"] for k in r.json()["resources"]) == ["app-config-key", "payments-root"], r.text
