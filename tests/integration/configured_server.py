"""Helpers for integration tests that run `p11kms server -config FILE` (not -dev): a throwaway
SoftHSM token in a temp dir, a hand-written YAML config, the server process, and optionally a
p11-kit remoting server in front of the token.

Every process here is started by the test and is stopped by its pid (never by name). Set
P11KMS_KEEP_TMP=1 to keep the temp directories for debugging.
"""

import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p11kms_testlib as tl  # noqa: E402

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
P11KIT_CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_hash(token):
    """`p11kms token hash` (token on stdin); checked against hashlib so a wrong hash shows up
    here rather than as a puzzling 403 later."""
    out = subprocess.run([tl.binary_path(), "token", "hash"], input=token.encode(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    line = out.stdout.decode().strip()
    assert line.startswith("token_sha256: "), line
    hexdigest = line.split(": ", 1)[1].strip()
    assert hexdigest == hashlib.sha256(token.encode()).hexdigest(), line
    return hexdigest


class SoftToken:
    """A SoftHSM token in <root>/tokens, initialized with `p11kms hsm init-token`."""

    def __init__(self, root, label=None):
        self.root = root
        self.label = label or "t-" + secrets.token_hex(4)
        self.so_pin = "so-" + secrets.token_hex(8)
        self.user_pin = "up-" + secrets.token_hex(8)
        self.tokendir = os.path.join(root, "tokens")
        self.conf = os.path.join(root, "softhsm2.conf")
        os.makedirs(self.tokendir, exist_ok=True)
        with open(self.conf, "w") as f:
            f.write("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = INFO\n"
                    % self.tokendir)

    def env(self, **extra):
        env = dict(os.environ)
        env["SOFTHSM2_CONF"] = self.conf
        for k in ("P11KMS_USER_PIN", "P11KMS_SO_PIN", "P11KMS_USER_PIN_FILE",
                  "P11KMS_SO_PIN_FILE", "P11_KIT_SERVER_ADDRESS"):
            env.pop(k, None)
        env.update(extra)
        return env

    def init(self):
        out = subprocess.run(
            [tl.binary_path(), "hsm", "init-token"], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
            env=self.env(P11KMS_TOKEN_LABEL=self.label, P11KMS_SO_PIN=self.so_pin,
                         P11KMS_USER_PIN=self.user_pin))
        assert out.returncode == 0, "init-token failed: %s %s" % (out.stdout, out.stderr)
        assert ("initialized token '%s'" % self.label) in out.stdout.decode(), out.stdout
        return self

    def write_pin_file(self, path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.user_pin + "\n")


def config_text(port, module, label, api_token_sha256, pin_file="user.pin",
                store_path="p11kms.db", sessions=2):
    """The YAML the README documents (relative paths: relative to the config file's folder)."""
    return (
        "listen:\n"
        "  address: 127.0.0.1:%d\n"
        "hsm:\n"
        "  module: %s\n"
        "  token_label: %s\n"
        "  pin_file: %s\n"
        "  sessions: %d\n"
        "store:\n"
        "  driver: sqlite\n"
        "  path: %s\n"
        "auth:\n"
        "  tokens:\n"
        "    - name: admin\n"
        "      token_sha256: %s\n"
        "      policies: [root]\n"
        "      namespaces: [root]\n"
    ) % (port, module, label, pin_file, sessions, store_path, api_token_sha256)


def configured(root, tokens, extra_yaml=""):
    """A SoftHSM token in root, a config file with those API tokens ([(name, secret), ...], each
    with policies [root]) plus extra_yaml, and a ConfiguredServer for it (not started).
    Returns (server, config_path, soft_token)."""
    token = SoftToken(root).init()
    token.write_pin_file(os.path.join(root, "user.pin"))
    port = free_port()
    path = os.path.join(root, "p11kms.yaml")
    lines = "".join("    - {name: %s, token_sha256: %s, policies: [root]}\n" % (name, token_hash(secret))
                    for name, secret in tokens)
    with open(path, "w") as f:
        f.write("listen:\n  address: 127.0.0.1:%d\n"
                "hsm:\n  module: %s\n  token_label: %s\n  pin_file: user.pin\n"
                "store:\n  path: p11kms.db\n"
                "auth:\n  tokens:\n%s%s" % (port, SOFTHSM_MODULE, token.label, lines, extra_yaml))
    return ConfiguredServer(path, token.env(), token=tokens[0][1], port=port), path, token


class ConfiguredServer:
    """`p11kms server -config FILE`; stdout and stderr go to one log file."""

    def __init__(self, config_path, env, token=None, port=None, cwd=None, log_path=None):
        self.config_path = config_path
        self.env = env
        self.token = token
        self.port = port
        self.cwd = cwd or os.path.dirname(config_path)
        self.log_path = log_path or os.path.join(os.path.dirname(config_path), "server.log")
        self.proc = None
        self.returncode = None
        self.session = requests.Session()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def spawn(self):
        with open(self.log_path, "ab") as logf:
            logf.write(("\n=== test harness: start %s server -config %s ===\n"
                        % (tl.binary_path(), self.config_path)).encode())
            logf.flush()
            self.proc = subprocess.Popen(
                [tl.binary_path(), "server", "-config", self.config_path],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.cwd, env=self.env, start_new_session=True)
        return self

    def start(self):
        """Spawn and wait for GET /v1/sys/health 200."""
        self.spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.returncode = rc
                raise AssertionError("p11kms exited with %d before answering health (last: %s)\n"
                                     "--- log tail ---\n%s" % (rc, last, self.log_tail()))
            try:
                r = self.session.get(self.url + "/v1/sys/health", timeout=2)
                if r.status_code == 200:
                    return self
                last = "health %d: %s" % (r.status_code, r.text[:300])
            except requests.RequestException as e:
                last = repr(e)
            time.sleep(0.1)
        raise AssertionError("p11kms did not answer health 200 within %ds (last: %s)\n"
                             "--- log tail ---\n%s" % (START_TIMEOUT_S, last, self.log_tail()))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """SIGTERM by pid, wait, SIGKILL by pid on timeout. Returns the exit code."""
        self.session.close()
        if self.proc is None:
            return self.returncode
        proc, self.proc = self.proc, None
        self.returncode = tl.stop_process(proc, STOP_TIMEOUT_S, self.log_path)
        return self.returncode

    def request(self, method, path, json=None, token=True, headers=None, timeout=10):
        hdrs = {}
        if token is True:
            hdrs["X-Vault-Token"] = self.token
        elif token:
            hdrs["X-Vault-Token"] = token
        if headers:
            hdrs.update(headers)
        return self.session.request(method, self.url + path, json=json, headers=hdrs,
                                    timeout=timeout)

    def log(self):
        time.sleep(tl.ACCESS_LOG_DELAY_S)
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=60):
        return "\n".join(self.log().splitlines()[-lines:])


# -- p11-kit remoting ---------------------------------------------------------------------------

def _proc_stat(pid):
    """(state, ppid, pgrp, session) of a live pid, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def _session_members(sid):
    """Live (non-zombie) pids whose session id is `sid`: a session the test created with
    setsid, so every member is a process the test started or one of its children."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _proc_stat(int(name))
        if st and st[3] == sid and st[0] != "Z":
            pids.append(int(name))
    return pids


def _wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _proc_stat(pid)
        if st is None or st[0] == "Z":
            return True
        time.sleep(0.05)
    return False


class P11KitServer:
    """`p11-kit server -f -n SOCKET --provider softhsm "pkcs11:token=LABEL"`, in its own session.

    p11-kit's server is a listener that spawns one `p11-kit-remote` worker per client
    connection; the worker keeps serving its connection after the listener exits. So "the HSM
    goes away" means: SIGTERM the listener, then SIGTERM each worker of its session, by pid.
    """

    def __init__(self, token, socket_path, log_path):
        self.token = token
        self.socket_path = socket_path
        self.log_path = log_path
        self.proc = None
        self.killed_workers = []

    @property
    def address(self):
        return "unix:path=" + self.socket_path

    def start(self, timeout=15.0):
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)   # stale socket of a listener that died hard
        with open(self.log_path, "ab") as logf:
            logf.write(b"\n=== test harness: start p11-kit server ===\n")
            logf.flush()
            self.proc = subprocess.Popen(
                ["p11-kit", "server", "-f", "-n", self.socket_path,
                 "--provider", SOFTHSM_MODULE, "pkcs11:token=" + self.token.label],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=self.token.env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("p11-kit server exited with %d:\n%s"
                                     % (self.proc.returncode, self.log()))
            if os.path.exists(self.socket_path):
                return self
            time.sleep(0.05)
        raise AssertionError("p11-kit server socket %s did not appear within %ss:\n%s"
                             % (self.socket_path, timeout, self.log()))

    def workers(self):
        if self.proc is None:
            return []
        return [p for p in _session_members(self.proc.pid) if p != self.proc.pid]

    def stop(self, timeout=10.0):
        """SIGTERM the listener by pid, then every worker of its session by pid; wait for all.
        Returns the worker pids that were killed."""
        if self.proc is None:
            return []
        sid = self.proc.pid
        proc, self.proc = self.proc, None
        tl.stop_process(proc, timeout)
        killed = []
        for pid in _session_members(sid):
            try:
                os.kill(pid, signal.SIGTERM)
                killed.append(pid)
            except ProcessLookupError:
                pass
        for pid in killed:
            if not _wait_gone(pid, timeout):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, timeout)
        self.killed_workers = killed
        return killed

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


def make_tmpdir(prefix):
    return tempfile.mkdtemp(prefix=prefix)


def remove_tmpdir(path):
    if path and not os.environ.get("P11KMS_KEEP_TMP"):
        shutil.rmtree(path, ignore_errors=True)


def serve_with_tokens(prefix, tokens, extra_yaml=""):
    """A configured server (own SoftHSM token, SQLite store) with several API tokens, started;
    yields it and stops and removes everything afterwards. For module-scoped pytest fixtures:
    `yield from serve_with_tokens(...)`.

    tokens: [(name, secret, policies, namespaces)], e.g. ("viewer", s, "[kms-viewer]", "[team-a]").
    The server's default token (srv.token) is the first one's secret. extra_yaml (e.g. a
    `policies:` section) is appended to the config."""
    root = make_tmpdir(prefix)
    try:
        token = SoftToken(root).init()
        token.write_pin_file(os.path.join(root, "user.pin"))
        port = free_port()
        path = os.path.join(root, "p11kms.yaml")
        with open(path, "w") as f:
            f.write("listen:\n  address: 127.0.0.1:%d\n"
                    "hsm:\n  module: %s\n  token_label: %s\n  pin_file: user.pin\n  sessions: 2\n"
                    "store:\n  path: p11kms.db\n"
                    "auth:\n  tokens:\n" % (port, SOFTHSM_MODULE, token.label))
            for name, secret, policies, namespaces in tokens:
                f.write("    - name: %s\n      token_sha256: %s\n      policies: %s\n      namespaces: %s\n"
                        % (name, token_hash(secret), policies, namespaces))
            f.write(extra_yaml)
        srv = ConfiguredServer(path, token.env(), token=tokens[0][1], port=port)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()
    finally:
        remove_tmpdir(root)
