"""docs/api/kong.md is executable: its ```sh blocks (Kong's own curl examples from its "Key and
Key Set Management" page first, adapted as the doc says, then p11kms's) run, in order, in one
bash shell against a real `p11kms server -dev` with $P11KMS_ADDR and $TOKEN set. Each example's
HTTP statuses are checked against EXPECTED, and the documented ```json right after an example
must have the same keys and JSON types as the real answer.

When an example is added, removed or reordered in the doc, update EXPECTED below.
"""

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import doc_examples  # noqa: E402  (the same doc runner as the keyring page's)
import p11kms_testlib as tl  # noqa: E402

DOC = os.path.join(tl.SOURCE_DIR, "docs", "api", "kong.md")
EXPECTED = [[200], [201], [200], [201], [200], [200], [200], [201], [200], [400], [204, 404],
            [201], [200], [200]]


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


def test_doc_examples_run_as_documented(server):
    def shredded(tmp):
        assert not os.path.exists(os.path.join(tmp, "path", "to", "private_key.pem")), "the example shreds it"

    results = doc_examples.run(DOC, server, "p11kms-kong-doc-", in_tmp=shredded)
    assert len(results) == len(EXPECTED), "docs/api/kong.md has %d examples; update EXPECTED" % len(results)
    for i, (code, sample, o, statuses) in enumerate(results):
        assert statuses == EXPECTED[i], "example %d: statuses %s, expected %s\n%s\n%s" % (i, statuses, EXPECTED[i], code, o)
        if sample is not None:
            real = json.loads(o)
            assert doc_examples.same_shape(sample, real), "example %d answered %s; the doc shows %s" % (i, real, sample)
            if "message" in sample:
                assert real["message"] == sample["message"], (real, sample)
