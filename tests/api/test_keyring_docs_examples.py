"""docs/api/keyring.md is executable: its ```sh blocks run, in order, in one bash shell against a
real `p11kms server -dev` with $P11KMS_ADDR and $TOKEN set. Each example's HTTP statuses are
checked against EXPECTED, and the documented ```json right after an example must have the same
keys and JSON types as the real answer (ids and keys differ per run).

When an example is added, removed or reordered in the doc, update EXPECTED below.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p11kms_testlib as tl  # noqa: E402

DOC = os.path.join(tl.SOURCE_DIR, "docs", "api", "keyring.md")
FENCE_RE = re.compile(r"^```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
# HTTP statuses of each example, in order.
EXPECTED = [[200], [201], [201], [200], [200], [204], [200, 409], [400]]


def examples(text):
    fences = [(m.group(1), m.group(2), m.start(), m.end()) for m in FENCE_RE.finditer(text)]
    out = []
    for i, (lang, body, _, end) in enumerate(fences):
        if lang != "sh":
            continue
        sample = None
        if i + 1 < len(fences) and fences[i + 1][0] == "json" and not re.search(r"^#", text[end:fences[i + 1][2]], re.M):
            sample = json.loads(fences[i + 1][1])
        out.append((body, sample))
    return out


def same_shape(doc, real):
    if isinstance(doc, dict):
        return isinstance(real, dict) and set(doc) == set(real) and all(same_shape(doc[k], real[k]) for k in doc)
    if isinstance(doc, list):
        return isinstance(real, list) and len(doc) == len(real) and all(same_shape(a, b) for a, b in zip(doc, real))
    return type(doc) is type(real)


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


def test_doc_examples_run_as_documented(server):
    with open(DOC, encoding="utf-8") as f:
        exs = examples(f.read())
    assert len(exs) == len(EXPECTED), "docs/api/keyring.md has %d examples; update EXPECTED" % len(exs)
    lines = ["curl() { command curl -q --max-time 20 -w '%{stderr}@@HTTP %{http_code}@@\\n' \"$@\"; }"]
    for i, (code, _) in enumerate(exs):
        lines += ["printf '@@BEGIN %d@@\\n'; printf '@@BEGIN %d@@\\n' >&2" % (i, i), code.rstrip("\n"),
                  "printf '\\n@@END %d@@\\n'; printf '@@END %d@@\\n' >&2" % (i, i)]
    with tempfile.TemporaryDirectory(prefix="p11kms-keyring-doc-") as tmp:
        path = os.path.join(tmp, "examples.sh")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8", "P11KMS_ADDR": server.url,
               "TOKEN": server.token}
        out = subprocess.run(["bash", "--noprofile", "--norc", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
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
                # Same message, up to the id in it.
                assert re.sub(r'\\?"[A-Za-z0-9]{8}\\?"', "ID", real["message"]) == \
                    re.sub(r'\\?"[A-Za-z0-9]{8}\\?"', "ID", sample["message"]), (real, sample)
