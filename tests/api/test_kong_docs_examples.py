"""docs/api/kong.md is executable: its ```sh blocks (Kong's own curl examples from its "Key and
Key Set Management" page first, adapted as the doc says, then p11kms's) run, in order, in one
bash shell against a real `p11kms server -dev` with $P11KMS_ADDR and $TOKEN set. Each example's
HTTP statuses are checked against EXPECTED, and the documented ```json right after an example
must have the same keys and JSON types as the real answer.

When an example is added, removed or reordered in the doc, update EXPECTED below.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import p11kms_testlib as tl  # noqa: E402
from test_keyring_docs_examples import examples, same_shape  # noqa: E402  (the same doc runner)

DOC = os.path.join(tl.SOURCE_DIR, "docs", "api", "kong.md")
EXPECTED = [[200], [201], [200], [201], [200], [200], [200], [201], [200], [400], [204, 404]]


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


def test_doc_examples_run_as_documented(server):
    with open(DOC, encoding="utf-8") as f:
        exs = examples(f.read())
    assert len(exs) == len(EXPECTED), "docs/api/kong.md has %d examples; update EXPECTED" % len(exs)
    lines = ["curl() { command curl -q --max-time 20 -w '%{stderr}@@HTTP %{http_code}@@\\n' \"$@\"; }"]
    for i, (code, _) in enumerate(exs):
        lines += ["printf '@@BEGIN %d@@\\n'; printf '@@BEGIN %d@@\\n' >&2" % (i, i), code.rstrip("\n"),
                  "printf '\\n@@END %d@@\\n'; printf '@@END %d@@\\n' >&2" % (i, i)]
    with tempfile.TemporaryDirectory(prefix="p11kms-kong-doc-") as tmp:
        path = os.path.join(tmp, "examples.sh")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8", "P11KMS_ADDR": server.url,
               "TOKEN": server.token}
        out = subprocess.run(["bash", "--noprofile", "--norc", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        assert not os.path.exists(os.path.join(tmp, "path", "to", "private_key.pem")), "the example shreds it"
    stdout, stderr = out.stdout.decode(), out.stderr.decode()
    for i, (code, sample) in enumerate(exs):
        o = re.search(r"@@BEGIN %d@@\n(.*?)\n@@END %d@@" % (i, i), stdout, re.S).group(1).strip()
        e = re.search(r"@@BEGIN %d@@\n(.*?)@@END %d@@" % (i, i), stderr, re.S).group(1)
        statuses = [int(s) for s in re.findall(r"@@HTTP (\d{3})@@", e)]
        assert statuses == EXPECTED[i], "example %d: statuses %s, expected %s\n%s\n%s" % (i, statuses, EXPECTED[i], code, o)
        if sample is not None:
            real = json.loads(o)
            assert same_shape(sample, real), "example %d answered %s; the doc shows %s" % (i, real, sample)
            if "message" in sample:
                assert real["message"] == sample["message"], (real, sample)
    # Kong's JWK example imported its RSA key into the token; the set's JWKS carries its public half
    # (checked before example 10 deleted my-set: here via my-other-set's EC key).
