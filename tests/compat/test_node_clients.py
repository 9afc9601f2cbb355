"""Compatibility with real, unmodified JavaScript clients from npm, pinned by
tests/compat/node/package-lock.json (scripts/test installs them with `npm ci`):

- IBM's Key Protect SDK (@ibm-cloud/ibm-key-protect) pointed at `<server>/kms` with a bearer
  token: create, list, count, get by id and name, metadata, versions, wrap with AAD, unwrap,
  rotate, unwrap the old ciphertext, rewrap, disable, enable, a 501 route, delete.
- node-vault: its transit commands on transit/, and the same calls on a mount it enables.

Each script asserts every answer and exits non-zero naming the failing step.
"""

import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p11kms_testlib as tl  # noqa: E402

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


def run_node(script, server, **env):
    node = shutil.which("node")
    assert node, "node is not installed (scripts/install-deps installs it)"
    assert os.path.isdir(os.path.join(NODE_DIR, "node_modules")), \
        "tests/compat/node/node_modules is missing: run scripts/install-node-clients"
    full_env = dict(os.environ, P11KMS_ADDR=server.url, P11KMS_TOKEN=server.token, **env)
    p = subprocess.run([node, script], cwd=NODE_DIR, env=full_env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, "%s failed:\n%s\n%s" % (script, p.stdout, p.stderr)
    return p.stdout


def test_ibm_key_protect_sdk_unmodified(server):
    out = run_node("key_protect_sdk.js", server, P11KMS_INSTANCE="sdk-" + tl.unique_name("i"))
    assert "key protect sdk: all steps passed" in out


def test_node_vault_on_default_and_mounted_engines(server):
    out = run_node("node_vault.js", server)
    assert "node-vault: all steps passed" in out
