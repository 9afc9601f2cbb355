"""HTTPS and mutual TLS as an operator configures them (listen.tls), with certificates made by
openssl for each run: TLS 1.2+ only, client certificates required and verified when a client CA
is set, and a clear start-up failure for a key that does not match its certificate."""
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # old TLS versions on purpose
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import p11kms_testlib as tl  # noqa: E402
import configured_server as cs  # noqa: E402


def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=60)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", name + ".key", "-out", name + ".pem", "-days", "2", "-subj", "/CN=" + name, cwd=d)


def make_cert(d, name, ca, ext):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + name, cwd=d)
    with open(os.path.join(d, name + ".ext"), "w") as f:
        f.write(ext)
    openssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key",
            "-CAcreateserial", "-out", name + ".pem", "-days", "2", "-extfile", name + ".ext", cwd=d)


@pytest.fixture(scope="module")
def pki():
    d = tempfile.mkdtemp(prefix="p11kms-pki-")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    make_cert(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    make_cert(d, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    make_cert(d, "bound", "ca", "extendedKeyUsage=clientAuth\n")    # bound to a token by hex
    make_cert(d, "bound2", "ca", "extendedKeyUsage=clientAuth\n")   # bound by openssl's colon form
    yield d
    shutil.rmtree(d, ignore_errors=True)


class TlsServer:
    def __init__(self, pki, tls_yaml, extra_tokens="", extra_yaml=""):
        self.root = tempfile.mkdtemp(prefix="p11kms-tls-")
        self.secret = "tok-" + os.urandom(8).hex()
        self.token = cs.SoftToken(self.root).init()
        self.token.write_pin_file(os.path.join(self.root, "user.pin"))
        self.port = cs.free_port()
        self.path = os.path.join(self.root, "p11kms.yaml")
        with open(self.path, "w") as f:
            f.write("listen:\n  address: 127.0.0.1:%d\n  tls:\n%s"
                    "hsm:\n  module: %s\n  token_label: %s\n  pin_file: user.pin\n"
                    "store:\n  path: p11kms.db\n"
                    "auth:\n  tokens:\n    - {name: ops, token_sha256: %s, policies: [root]}\n%s%s"
                    % (self.port, tls_yaml.replace("PKI", pki), cs.SOFTHSM_MODULE, self.token.label,
                       cs.token_hash(self.secret), extra_tokens, extra_yaml))
        # No system OpenSSL policy (Debian's sets TLS 1.2 minimum): p11kms's own must hold.
        self.srv = cs.ConfiguredServer(self.path, self.token.env(OPENSSL_CONF="/dev/null"), token=self.secret,
                                       port=self.port)
        self.url = "https://127.0.0.1:%d" % self.port

    def wait_listening(self):
        self.srv.spawn()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.srv.alive(), self.srv.log_tail()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError("no listener: " + self.srv.log_tail())

    def close(self):
        self.srv.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def handshake(port, ca, max_version=None, min_version=None, cert=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")  # let the client offer old versions; the server must refuse
    if max_version:
        ctx.maximum_version = max_version
    if min_version:
        ctx.minimum_version = min_version
    if cert:
        ctx.load_cert_chain(*cert)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return s.version()


def s_client(port, ca, version_flag):
    # A client with no OpenSSL policy of its own, willing to speak old versions.
    env = dict(os.environ, OPENSSL_CONF="/dev/null")
    out = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, version_flag,
                          "-cipher", "DEFAULT@SECLEVEL=0", "-CAfile", ca, "-verify_return_error"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=env, timeout=30)
    return out.returncode, out.stdout.decode(errors="replace")


def test_https_serves_and_refuses_plain_http_and_old_tls(pki):
    s = TlsServer(pki, "    cert_file: PKI/server.pem\n    key_file: PKI/server.key\n").wait_listening()
    try:
        ca = os.path.join(pki, "ca.pem")
        r = requests.get(s.url + "/v1/sys/health", verify=ca, timeout=10)
        assert r.status_code == 200 and r.json()["sealed"] is False
        r = requests.post(s.url + "/v1/transit/keys/tls-key", json={}, verify=ca, timeout=10,
                          headers={"X-Vault-Token": s.secret})
        assert r.status_code == 200, r.text
        with pytest.raises(requests.RequestException):
            requests.get("http://127.0.0.1:%d/v1/sys/health" % s.port, timeout=5)
        assert handshake(s.port, ca, max_version=ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        # What a client sees. Note: on Debian 12's OpenSSL 3 even s_server and s_client both
        # forced to TLS 1.1 cannot complete a handshake, so this cannot tell p11kms's own
        # TLS-1.2 minimum (kept for other platforms) from the platform's; checked by mutation.
        for old in ("-tls1_1", "-tls1"):
            rc, out = s_client(s.port, ca, old)
            assert rc != 0, out
        rc, out = s_client(s.port, ca, "-tls1_2")
        assert rc == 0 and "TLSv1.2" in out, out
        assert s.srv.alive()
    finally:
        s.close()


def test_mutual_tls_requires_a_certificate_from_the_client_ca(pki):
    s = TlsServer(pki, "    cert_file: PKI/server.pem\n    key_file: PKI/server.key\n"
                       "    client_ca_file: PKI/ca.pem\n").wait_listening()
    try:
        ca = os.path.join(pki, "ca.pem")
        client = (os.path.join(pki, "client.pem"), os.path.join(pki, "client.key"))
        stranger = (os.path.join(pki, "stranger.pem"), os.path.join(pki, "stranger.key"))
        with pytest.raises(requests.RequestException):
            requests.get(s.url + "/v1/sys/health", verify=ca, timeout=10)
        with pytest.raises(requests.RequestException):
            requests.get(s.url + "/v1/sys/health", verify=ca, cert=stranger, timeout=10)
        r = requests.get(s.url + "/v1/sys/health", verify=ca, cert=client, timeout=10)
        assert r.status_code == 200
        # A certificate identifies the channel, not the caller: the token is still required.
        r = requests.get(s.url + "/v1/auth/token/lookup-self", verify=ca, cert=client, timeout=10)
        assert r.status_code == 403
        r = requests.get(s.url + "/v1/auth/token/lookup-self", verify=ca, cert=client, timeout=10,
                         headers={"X-Vault-Token": s.secret})
        assert r.status_code == 200
        assert s.srv.alive()
    finally:
        s.close()


def der_sha256(pem_path):
    with open(pem_path) as f:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest()


def openssl_fingerprint(pem_path):
    """`openssl x509 -noout -fingerprint -sha256` as an operator would copy it: AB:CD:..."""
    out = subprocess.run(["openssl", "x509", "-in", pem_path, "-noout", "-fingerprint", "-sha256"],
                         stdout=subprocess.PIPE, check=True, timeout=30).stdout.decode().strip()
    fp = out.split("=", 1)[1]
    assert fp.replace(":", "").lower() == der_sha256(pem_path), out
    return fp


MTLS = "    cert_file: PKI/server.pem\n    key_file: PKI/server.key\n    client_ca_file: PKI/ca.pem\n"
CERT_POLICY = ("policies:\n  certapp:\n"
               "    - {path: transit/keys/+, capabilities: [read]}\n"
               "    - {path: transit/encrypt/cert-*, capabilities: [update]}\n")


def cert_tokens(pki, bound_fp, bound2_fp):
    return ("    - name: certapp\n      token_sha256: %s\n      policies: [certapp]\n"
            "      cert_sha256: %s\n"
            "    - name: certapp2\n      token_sha256: %s\n      policies: [certapp]\n"
            "      cert_sha256: \"%s\"\n"
            % (hashlib.sha256(os.urandom(16)).hexdigest(), bound_fp,
               hashlib.sha256(os.urandom(16)).hexdigest(), bound2_fp))


def test_a_client_certificate_bound_to_a_token_authenticates_as_it(pki):
    ca = os.path.join(pki, "ca.pem")
    client = (os.path.join(pki, "client.pem"), os.path.join(pki, "client.key"))
    bound = (os.path.join(pki, "bound.pem"), os.path.join(pki, "bound.key"))
    bound2 = (os.path.join(pki, "bound2.pem"), os.path.join(pki, "bound2.key"))
    colon_fp = openssl_fingerprint(bound2[0])
    assert ":" in colon_fp and colon_fp.upper() == colon_fp
    s = TlsServer(pki, MTLS, extra_tokens=cert_tokens(pki, der_sha256(bound[0]), colon_fp),
                  extra_yaml=CERT_POLICY + "audit:\n  path: audit.log\n").wait_listening()
    try:
        def call(method, path, cert, token=None, headers=None, **kw):
            headers = dict(headers or {})
            if token:
                headers["X-Vault-Token"] = token
            return requests.request(method, s.url + path, verify=ca, cert=cert, headers=headers,
                                    timeout=15, **kw)

        # A token header still works over mTLS (with a certificate bound to no token).
        r = call("POST", "/v1/transit/keys/cert-k", client, s.secret, json={})
        assert r.status_code == 200, r.text
        r = call("POST", "/v1/transit/keys/other-k", client, s.secret, json={})
        assert r.status_code == 200, r.text

        # The bound certificate, no token header: exactly what policy certapp allows.
        r = call("GET", "/v1/transit/keys/cert-k", bound)
        assert r.status_code == 200, r.text
        r = call("POST", "/v1/transit/encrypt/cert-k", bound, json={"plaintext": tl.b64(b"by cert")})
        assert r.status_code == 200, r.text
        assert r.json()["data"]["ciphertext"].startswith("vault:v1:")
        for method, path, body in (("POST", "/v1/transit/encrypt/other-k", {"plaintext": tl.b64(b"x")}),
                                   ("POST", "/v1/transit/keys/cert-new", {}),
                                   ("POST", "/v1/transit/decrypt/cert-k", {"ciphertext": "vault:v1:AAAA"}),
                                   ("DELETE", "/v1/transit/keys/cert-k", None)):
            r = call(method, path, bound, json=body)
            assert r.status_code == 403, (method, path, r.status_code, r.text)
        r = call("GET", "/v1/auth/token/lookup-self", bound)
        assert r.status_code == 200, r.text
        assert r.json()["data"]["display_name"] == "token-certapp"
        assert r.json()["data"]["policies"] == ["certapp"]

        # The colon form of the fingerprint in the config binds its certificate just as well.
        r = call("GET", "/v1/transit/keys/cert-k", bound2)
        assert r.status_code == 200, r.text
        assert call("GET", "/v1/auth/token/lookup-self", bound2).json()["data"]["display_name"] == "token-certapp2"
        assert call("POST", "/v1/transit/keys/cert-new", bound2, json={}).status_code == 403

        # A valid certificate bound to no token, without a token header: what a missing token
        # gets today (403 in Vault's dialect, 401 in IBM's).
        r = call("GET", "/v1/transit/keys/cert-k", client)
        assert r.status_code == 403, r.text
        r = call("GET", "/v1/auth/token/lookup-self", client)
        assert r.status_code == 403, r.text
        r = call("GET", "/kms/api/v2/keys", client, headers={"bluemix-instance": "i-1"})
        assert r.status_code == 401, r.text
        r = call("GET", "/kms/api/v2/keys", bound, headers={"bluemix-instance": "i-1"})
        assert r.status_code == 403, r.text  # authenticated as certapp, which has no kms rights

        # A presented token header is judged on its own: a wrong one is refused even with a bound
        # certificate, and a valid one wins over the certificate's token.
        r = call("GET", "/v1/transit/keys/cert-k", bound, "hvs.wrong")
        assert r.status_code == 403, r.text
        r = call("POST", "/v1/transit/keys/cert-by-header", bound, s.secret, json={})
        assert r.status_code == 200, r.text

        # The audit record names the certificate's token.
        with open(os.path.join(s.root, "audit.log")) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        enc = [l for l in lines if l["path"] == "/v1/transit/encrypt/cert-k" and l["status"] == 200]
        assert enc and enc[-1]["token"] == "certapp", enc
        assert any(l["token"] == "certapp2" for l in lines)

        # SIGHUP: a binding removed from the file stops authenticating, without a restart.
        with open(s.path) as f:
            text = f.read()
        with open(s.path, "w") as f:
            f.write(text.replace("      cert_sha256: %s\n" % der_sha256(bound[0]), ""))
        s.srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "SIGHUP: reloaded" not in s.srv.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "SIGHUP: reloaded" in s.srv.log(), s.srv.log_tail()
        r = call("GET", "/v1/transit/keys/cert-k", bound)
        assert r.status_code == 403, r.text
        assert call("GET", "/v1/transit/keys/cert-k", bound2).status_code == 200
        assert s.srv.alive()
    finally:
        s.close()


def test_a_malformed_cert_fingerprint_stops_the_start_naming_the_field(pki):
    s = TlsServer(pki, MTLS, extra_tokens="    - {name: bad, token_sha256: %s, cert_sha256: \"AB:CD\"}\n"
                  % hashlib.sha256(b"x").hexdigest())
    try:
        s.srv.spawn()
        assert s.srv.proc.wait(timeout=60) == 2
        assert "auth.tokens[1].cert_sha256" in s.srv.log(), s.srv.log_tail()
    finally:
        s.close()


def test_a_key_that_does_not_match_its_certificate_stops_the_start(pki):
    s = TlsServer(pki, "    cert_file: PKI/server.pem\n    key_file: PKI/client.key\n")
    try:
        s.srv.spawn()
        assert s.srv.proc.wait(timeout=60) != 0
        assert "TLS" in s.srv.log() and "mismatch" in s.srv.log()
    finally:
        s.close()


def test_an_unreadable_certificate_stops_the_start(pki):
    s = TlsServer(pki, "    cert_file: PKI/missing.pem\n    key_file: PKI/server.key\n")
    try:
        s.srv.spawn()
        assert s.srv.proc.wait(timeout=60) != 0
        assert "missing.pem" in s.srv.log()
    finally:
        s.close()
