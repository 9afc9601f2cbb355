"""Shared helpers for the Python end-to-end tests (api/, compat/, integration/).

Real parts only: every test talks to the real `p11kms server -dev` binary, which runs its own
throwaway SoftHSM token and SQLite file in a temp directory.

Usage from a test module:

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import p11kms_testlib as tl

    @pytest.fixture(scope="module")
    def server():
        yield from tl.serve()

    @pytest.fixture(autouse=True)
    def _server_log_on_failure(request, server):
        yield from tl.log_tail_on_failure(request, server)

Environment: P11KMS_BIN (path to the binary; ctest sets it), P11KMS_SOURCE_DIR (repo root).
Without P11KMS_BIN the binary is looked up at <repo>/build/p11kms.
Set P11KMS_KEEP_TMP=1 to keep the temp directories for debugging.
"""

import base64
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time

import requests

# The server writes its per-request access lines from a background thread within 50 ms
# (common/log.hpp, kAccessFlushIntervalMs); a log read waits twice that, so that it sees them.
ACCESS_LOG_DELAY_S = 0.1

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("P11KMS_SOURCE_DIR") or os.path.dirname(HERE)
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEV_TOKEN_LABEL = "p11kms-dev"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 60.0


def binary_path():
    path = os.environ.get("P11KMS_BIN") or os.path.join(SOURCE_DIR, "build", "p11kms")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise RuntimeError(
            "p11kms binary not found at %r (set P11KMS_BIN to the built binary)" % path)
    return path


def free_port():
    """A currently free TCP port on 127.0.0.1 (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_token():
    alphabet = string.ascii_letters + string.digits
    return "hvs." + "".join(secrets.choice(alphabet) for _ in range(24))


def unique_name(prefix="k"):
    """A fresh valid key name ([A-Za-z0-9._-], no underscore so field-name checks stay clean)."""
    return "%s-%s" % (prefix, secrets.token_hex(6))


def b64(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    return base64.b64decode(text, validate=True)


def errors_text(resp):
    """All of a Vault-style error body's messages, joined and lower-cased ('' if none)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.lower()
    errs = body.get("errors") if isinstance(body, dict) else None
    if not errs:
        return ""
    return " | ".join(str(e) for e in errs).lower()


def names(resp, needle):
    """True if the error message mentions `needle`, case-insensitively, treating '_' and ' '
    alike (so `min_decryption_version` matches Vault's "min decryption version")."""
    hay = errors_text(resp).replace("_", " ")
    return needle.lower().replace("_", " ") in hay


def describe(resp):
    """One line for assertion messages: status, request id and body (truncated)."""
    body = resp.text
    if len(body) > 600:
        body = body[:600] + "...(%d bytes)" % len(resp.text)
    return "HTTP %s %s %s -> %s %s" % (
        resp.request.method, resp.request.path_url, resp.headers.get("X-Request-Id"),
        resp.status_code, body)


def stop_process(proc, timeout, log_path=None):
    """SIGTERM a child by its pid, wait, SIGKILL on timeout (noting it in log_path). Returns
    the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            if log_path:
                with open(log_path, "ab") as logf:
                    logf.write(b"\n=== test harness: SIGKILL after SIGTERM timeout ===\n")
    return proc.returncode


class DevServer:
    """`p11kms server -dev` on a free loopback port with its own data dir and root token."""

    def __init__(self, data_dir=None, port=None, token=None, extra_args=()):
        self.tmpdir = tempfile.mkdtemp(prefix="p11kms-test-")
        self.data_dir = data_dir or os.path.join(self.tmpdir, "data")
        os.makedirs(self.data_dir, exist_ok=True)
        self.log_path = os.path.join(self.tmpdir, "server.log")
        self.token = token or random_token()
        self._fixed_port = port
        self.port = port
        self.extra_args = list(extra_args)
        self.proc = None
        self.exit_codes = []      # return code of every stop(), in order
        self._session = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def argv(self):
        return [binary_path(), "server", "-dev",
                "-dev-data-dir", self.data_dir,
                "-dev-listen-address", "127.0.0.1:%d" % self.port,
                "-dev-root-token-id", self.token] + self.extra_args

    def start(self):
        """Start the server and wait until GET /v1/sys/health answers 200. If the first start
        loses the race for a freshly picked port, retry on another one (never on restart)."""
        if self.proc is not None and self.proc.poll() is None:
            # A second start would leave the first process running after stop().
            raise RuntimeError("DevServer.start(): the server is already running (pid %d)" % self.proc.pid)
        attempts = 1 if self.port is not None else 3
        last_error = None
        for _ in range(attempts):
            if self.port is None or (self._fixed_port is None and last_error is not None):
                self.port = free_port()
            try:
                self._spawn_and_wait()
                return self
            except _EarlyExit as e:
                last_error = e
        raise RuntimeError("p11kms server did not start: %s\n--- log tail ---\n%s"
                           % (last_error, self.log_tail()))

    def _spawn_and_wait(self):
        with open(self.log_path, "ab") as logf:
            shown = ["<root token>" if a == self.token else a for a in self.argv()]
            logf.write(("\n=== test harness: start %s ===\n" % " ".join(shown)).encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.tmpdir, start_new_session=True)
        self._session = requests.Session()
        deadline = time.monotonic() + START_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.exit_codes.append(rc)
                self.proc = None
                raise _EarlyExit("exited with code %d before answering health (last: %s)"
                                 % (rc, last))
            try:
                r = self._session.get(self.url + "/v1/sys/health", timeout=2)
                if r.status_code == 200:
                    return
                last = "health answered %d: %s" % (r.status_code, r.text[:200])
            except requests.RequestException as e:
                last = repr(e)
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("p11kms server did not answer health 200 within %ds (last: %s)\n"
                           "--- log tail ---\n%s" % (START_TIMEOUT_S, last, self.log_tail()))

    def stop(self):
        """SIGTERM, wait, then SIGKILL. Returns the exit code (None if it was not running)."""
        if self._session is not None:
            self._session.close()
            self._session = None
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        code = stop_process(proc, STOP_TIMEOUT_S, self.log_path)
        self.exit_codes.append(code)
        return code

    def restart(self):
        """Stop, then start again on the same data dir, port and root token."""
        self.stop()
        self._fixed_port = self.port
        self.start()
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self):
        self.stop()
        if not os.environ.get("P11KMS_KEEP_TMP"):
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        try:
            self.stop()
            if exc_type is not None:
                sys.__stderr__.write("\n--- p11kms server log tail (%s) ---\n%s\n"
                                 % (self.log_path, self.log_tail()))
        finally:
            self.cleanup()
        return False

    # -- HTTP --------------------------------------------------------------------------------

    def request(self, method, path, json=None, headers=None, token=True, data=None,
                params=None, timeout=REQUEST_TIMEOUT_S):
        """One HTTP request. token=True sends the root token as X-Vault-Token, token=False sends
        none, a string sends that string."""
        hdrs = {}
        if token is True:
            hdrs["X-Vault-Token"] = self.token
        elif token:
            hdrs["X-Vault-Token"] = token
        if headers:
            hdrs.update(headers)
        session = self._session or requests
        return session.request(method, self.url + path, json=json, data=data, headers=hdrs,
                               params=params, timeout=timeout)

    # -- files -------------------------------------------------------------------------------

    def log(self):
        return self.log_bytes().decode("utf-8", "replace")

    def log_bytes(self):
        time.sleep(ACCESS_LOG_DELAY_S)
        try:
            with open(self.log_path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def log_tail(self, lines=60):
        return "\n".join(self.log().splitlines()[-lines:])

    def user_pin(self):
        with open(os.path.join(self.data_dir, "user.pin"), "r") as f:
            pin = f.read()
        return pin[:-1] if pin.endswith("\n") else pin


class _EarlyExit(Exception):
    pass


# -- plain functions the test modules turn into fixtures ------------------------------------

def serve(**kwargs):
    """Generator body for a module-scoped fixture: start a DevServer, yield it, always stop
    and clean it up."""
    srv = DevServer(**kwargs)
    srv.start()
    try:
        yield srv
    finally:
        srv.cleanup()


def log_tail_on_failure(request, *servers):
    """Generator body for an autouse function fixture: when the test failed, print the servers'
    log tails straight to the terminal (pytest's capture would hide teardown output)."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        for srv in servers:
            emit(request, "\n--- p11kms server log tail for %s (%s) ---\n%s\n"
                 % (request.node.nodeid, srv.log_path, srv.log_tail()))


def emit(request, text):
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(text)
    else:
        sys.__stderr__.write(text + "\n")
