"""docs/api/byok.md is executable: its ```sh blocks run, in order, in one bash shell against a
real `p11kms server -dev`, with $P11KMS_ADDR and $TOKEN set as a reader would set them. Each
block's output is checked below (EXPECTED, one entry per block, in order).

When an example is added, removed or reordered in the doc, update EXPECTED below.
"""

import json
import os
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p11kms_testlib as tl  # noqa: E402

DOC = os.path.join(tl.SOURCE_DIR, "docs", "api", "byok.md")
FENCE_RE = re.compile(r"^```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARK = "=== p11kms-doc-block %d ==="


def created_p11kms(out):
    k = json.loads(out)
    assert k["kind"] == "Key" and k["id"].startswith("cck-"), out
    assert k["key"] == {"kind": "P11kmsKey", "key_id": "billing-root"}, out
    assert k["validation"]["phase"] == "VALID" and k["validation"]["region"] == "local", out
    assert k["state"] == "AVAILABLE", out


def created_aws(out):
    k = json.loads(out)
    assert k["provider"] == "AWS" and k["validation"]["phase"] == "INITIALIZING", out
    assert k["validation"]["message"] == "no validator configured for provider AWS", out


def listed_one_billing_p11kms(out):
    body = json.loads(out)
    assert body["kind"] == "KeyList" and body["metadata"]["total_size"] == 1, out
    assert [k["display_name"] for k in body["data"]] == ["Billing root"], out
    assert "next" not in body["metadata"], out


def listed_in_use(out):
    body = json.loads(out)
    assert [k["provider"] for k in body["data"]] == ["P11KMS"], out
    assert body["data"][0]["state"] == "IN_USE", out


def invalid_disabled(out):
    # The disable prints nothing (204); the validated key follows.
    k = json.loads(out)
    assert k["validation"]["phase"] == "INVALID" and "disabled" in k["validation"]["message"], out


def delete_refused(out):
    e = json.loads(out)["errors"][0]
    assert e["status"] == "409" and e["code"] == "key_in_use", out


def bad_page_size(out):
    e = json.loads(out)["errors"][0]
    assert e["status"] == "400" and e["source"] == {"parameter": "page_size"}, out


EXPECTED = [created_p11kms, created_aws, listed_one_billing_p11kms, listed_in_use, invalid_disabled,
            delete_refused, bad_page_size]


def sh_blocks():
    with open(DOC) as f:
        text = f.read()
    return [m.group(2) for m in FENCE_RE.finditer(text) if m.group(1) == "sh"]


def test_doc_examples_run_and_answer_as_documented():
    blocks = sh_blocks()
    assert len(blocks) == len(EXPECTED), "update EXPECTED: the doc has %d sh blocks" % len(blocks)
    server = tl.DevServer()
    server.start()
    try:
        script = "set -u\n"
        for i, b in enumerate(blocks):
            script += "echo; echo '%s'\n%s\n" % (MARK % i, b)
        env = dict(os.environ, P11KMS_ADDR=server.url, TOKEN=server.token)
        out = subprocess.run(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             timeout=120)
        assert out.returncode == 0, out.stderr.decode()
        text = out.stdout.decode()
        parts = re.split(r"^=== p11kms-doc-block (\d+) ===$", text, flags=re.M)
        outputs = {int(parts[i]): parts[i + 1].strip() for i in range(1, len(parts), 2)}
        assert sorted(outputs) == list(range(len(blocks))), text
        for i, check in enumerate(EXPECTED):
            try:
                check(outputs[i])
            except (AssertionError, ValueError, KeyError) as e:
                pytest.fail("docs/api/byok.md sh block %d (%s): %s\noutput: %s" % (i + 1, check.__name__, e, outputs[i]))
    finally:
        server.cleanup()
