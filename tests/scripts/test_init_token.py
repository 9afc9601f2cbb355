"""scripts/init-token against a real SoftHSM token in a temp directory.

Run by ctest with Debian's /usr/bin/python3 (it has PyKCS11): P11KMS_BIN is the p11kms binary,
P11KMS_SOURCE_DIR the repository root. The script hands the PKCS#11 work to
`p11kms hsm init-token` (see the contract); these tests check the operator-visible behaviour:
first init, idempotent re-run, PIN mismatch, --force, PIN files, missing PINs.

The token is inspected from a separate PyKCS11 process each time, so every look is a fresh
C_Initialize that reads the token directory as another process would.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE_DIR = Path(os.environ.get("P11KMS_SOURCE_DIR") or Path(__file__).resolve().parents[2])
SCRIPT = SOURCE_DIR / "scripts" / "init-token"
BIN = os.environ.get("P11KMS_BIN") or str(SOURCE_DIR / "build" / "p11kms")
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
LABEL = "p11kms-script-test"
SO_PIN = "so-pin-5678"
USER_PIN = "user-pin-1234"
TIMEOUT = 120

# Runs in a child process: argv[1] = action, argv[2] = label; the PIN comes from INSPECT_PIN.
# Prints one JSON document.
INSPECT = r"""
import json, os, sys
import PyKCS11
from PyKCS11.LowLevel import CKF_TOKEN_INITIALIZED

action, label = sys.argv[1], sys.argv[2]
lib = PyKCS11.PyKCS11Lib()
lib.load(os.environ["INSPECT_MODULE"])

tokens = []
slot_of_label = None
for slot in lib.getSlotList(tokenPresent=True):
    info = lib.getTokenInfo(slot)
    initialized = bool(info.flags & CKF_TOKEN_INITIALIZED)
    entry = {"label": info.label.strip(" \x00"), "serial": info.serialNumber.strip(" \x00"),
             "initialized": initialized}
    tokens.append(entry)
    if initialized and entry["label"] == label and slot_of_label is None:
        slot_of_label = slot

if action == "tokens":
    print(json.dumps({"tokens": tokens}))
    sys.exit(0)

if slot_of_label is None:
    print(json.dumps({"error": "no token labelled " + label}))
    sys.exit(0)

session = lib.openSession(slot_of_label, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
try:
    session.login(os.environ["INSPECT_PIN"])
except PyKCS11.PyKCS11Error as e:
    print(json.dumps({"login": False, "error": str(e)}))
    sys.exit(0)

if action == "keygen":
    template = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
        (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
        (PyKCS11.CKA_VALUE_LEN, 32),
        (PyKCS11.CKA_TOKEN, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_PRIVATE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_SENSITIVE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_EXTRACTABLE, PyKCS11.CK_FALSE),
        (PyKCS11.CKA_ENCRYPT, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_DECRYPT, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_LABEL, "probe-key"),
    ]
    session.generateKey(template, mecha=PyKCS11.MechanismAESGENERATEKEY)

labels = []
for obj in session.findObjects([(PyKCS11.CKA_TOKEN, PyKCS11.CK_TRUE)]):
    value = session.getAttributeValue(obj, [PyKCS11.CKA_LABEL])[0]
    if isinstance(value, str):
        labels.append(value)
    else:
        labels.append(bytes(value or b"").decode())
session.logout()
session.closeSession()
print(json.dumps({"login": True, "objects": sorted(labels)}))
"""


class Hsm:
    """A throwaway SoftHSM token directory and the environment init-token is run with."""

    def __init__(self, root: Path):
        self.root = root
        self.tokendir = root / "tokens"
        self.tokendir.mkdir()
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {self.tokendir}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
        )
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("P11KMS_") and k != "SOFTHSM2_CONF"}
        env.update({
            "SOFTHSM2_CONF": str(self.conf),
            "P11KMS_BIN": BIN,
            "P11KMS_SOURCE_DIR": str(SOURCE_DIR),
            "P11KMS_TOKEN_LABEL": LABEL,
            "P11KMS_SO_PIN": SO_PIN,
            "P11KMS_USER_PIN": USER_PIN,
        })
        self.env = env

    def run(self, *args, env=None, unset=(), cwd=None, argv0=None):
        e = dict(self.env if env is None else env)
        for name in unset:
            e.pop(name, None)
        cmd = [str(argv0 or SCRIPT), *args]
        return subprocess.run(cmd, env=e, cwd=cwd or self.root, capture_output=True, text=True,
                              timeout=TIMEOUT)

    def inspect(self, action, pin=USER_PIN, conf=None):
        e = dict(os.environ)
        e.update({"SOFTHSM2_CONF": str(conf or self.conf), "INSPECT_MODULE": MODULE,
                  "INSPECT_PIN": pin})
        p = subprocess.run([sys.executable, "-c", INSPECT, action, LABEL], env=e,
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    def token(self, conf=None):
        """The initialized token labelled LABEL, or None."""
        found = [t for t in self.inspect("tokens", conf=conf)["tokens"]
                 if t["initialized"] and t["label"] == LABEL]
        assert len(found) <= 1, found
        return found[0] if found else None

    def objects(self, pin=USER_PIN):
        r = self.inspect("objects", pin=pin)
        assert r.get("login"), r
        return r["objects"]


def out(p):
    return p.stdout + p.stderr


def describe(p):
    return f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"


@pytest.fixture
def hsm(tmp_path):
    if not os.access(BIN, os.X_OK):
        if os.environ.get("P11KMS_BIN"):
            pytest.fail(f"P11KMS_BIN={BIN} is not an executable file")
        pytest.skip(f"{BIN} is not built (set P11KMS_BIN or run scripts/build)")
    return Hsm(tmp_path)


def test_first_run_initializes_the_token(hsm):
    assert hsm.token() is None

    p = hsm.run()
    assert p.returncode == 0, describe(p)
    assert f"initialized token '{LABEL}'" in p.stdout, describe(p)

    token = hsm.token()
    assert token is not None and token["serial"]
    assert hsm.objects() == []  # the user PIN logs in; nothing on the token yet

    shown = subprocess.run(["softhsm2-util", "--show-slots"], env=hsm.env, capture_output=True,
                           text=True, timeout=TIMEOUT)
    assert shown.returncode == 0, shown.stderr
    assert LABEL in shown.stdout


def test_second_run_is_idempotent(hsm):
    p = hsm.run()
    assert p.returncode == 0, describe(p)
    serial = hsm.token()["serial"]
    assert hsm.inspect("keygen")["objects"] == ["probe-key"]

    p = hsm.run()
    assert p.returncode == 0, describe(p)
    assert "already initialized" in out(p), describe(p)
    assert hsm.token()["serial"] == serial
    assert hsm.objects() == ["probe-key"]  # untouched

    # Only one token carries the label: no second slot was initialized.
    labels = [t["label"] for t in hsm.inspect("tokens")["tokens"] if t["initialized"]]
    assert labels == [LABEL]


def test_rerun_with_a_wrong_user_pin_fails_and_changes_nothing(hsm):
    p = hsm.run()
    assert p.returncode == 0, describe(p)
    serial = hsm.token()["serial"]
    hsm.inspect("keygen")

    env = dict(hsm.env, P11KMS_USER_PIN="not-the-user-pin")
    p = hsm.run(env=env)
    assert p.returncode == 1, describe(p)
    assert "PIN" in out(p), describe(p)
    assert "not-the-user-pin" not in out(p), "a PIN must never be echoed"
    assert hsm.token()["serial"] == serial
    assert hsm.objects() == ["probe-key"]


def test_force_reinitializes_and_destroys_objects(hsm):
    p = hsm.run()
    assert p.returncode == 0, describe(p)
    assert hsm.inspect("keygen")["objects"] == ["probe-key"]

    p = hsm.run("--force")
    assert p.returncode == 0, describe(p)
    assert "already initialized" not in out(p), describe(p)

    assert hsm.token() is not None
    assert hsm.objects() == []  # the object made before is gone; the user PIN is set again


def test_force_with_a_wrong_so_pin_fails_and_keeps_objects(hsm):
    p = hsm.run()
    assert p.returncode == 0, describe(p)
    hsm.inspect("keygen")

    p = hsm.run("--force", env=dict(hsm.env, P11KMS_SO_PIN="not-the-so-pin"))
    assert p.returncode != 0, describe(p)
    assert "not-the-so-pin" not in out(p), "a PIN must never be echoed"
    assert hsm.objects() == ["probe-key"]


def test_pins_from_files(hsm):
    so_file = hsm.root / "so.pin"
    user_file = hsm.root / "user.pin"
    for f, pin in ((so_file, "file-so-pin"), (user_file, "file-user-pin")):
        f.write_text(pin + "\n")  # one trailing newline is stripped
        f.chmod(stat.S_IRUSR | stat.S_IWUSR)
    env = dict(hsm.env, P11KMS_SO_PIN_FILE=str(so_file), P11KMS_USER_PIN_FILE=str(user_file))
    del env["P11KMS_SO_PIN"], env["P11KMS_USER_PIN"]

    p = hsm.run(env=env)
    assert p.returncode == 0, describe(p)
    assert hsm.token() is not None
    assert hsm.objects(pin="file-user-pin") == []

    # Re-run from the files: idempotent, and the file's user PIN matches the token.
    p = hsm.run(env=env)
    assert p.returncode == 0, describe(p)
    assert "already initialized" in out(p), describe(p)

    # --force needs the SO PIN: the one from the file is the right one.
    hsm.inspect("keygen", pin="file-user-pin")
    p = hsm.run("--force", env=env)
    assert p.returncode == 0, describe(p)
    assert hsm.objects(pin="file-user-pin") == []


@pytest.mark.parametrize("missing", ["P11KMS_SO_PIN", "P11KMS_USER_PIN"])
def test_a_missing_pin_exits_2_naming_the_variable(hsm, missing):
    p = hsm.run(unset=[missing, missing + "_FILE"])
    assert p.returncode == 2, describe(p)
    assert missing in p.stderr, describe(p)
    assert hsm.token() is None

    # The binary itself, as the contract says (the script may check first).
    env = dict(hsm.env)
    env.pop(missing)
    p = subprocess.run([BIN, "hsm", "init-token"], env=env, cwd=hsm.root, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == 2, describe(p)
    assert missing in p.stderr, describe(p)
    assert hsm.token() is None


def test_pins_are_refused_on_the_command_line(hsm):
    p = hsm.run(USER_PIN)
    assert p.returncode == 2, describe(p)
    assert hsm.token() is None


def test_module_by_path_and_by_p11kit_name(hsm):
    p = hsm.run("--module", MODULE)
    assert p.returncode == 0, describe(p)
    assert hsm.token() is not None

    p = hsm.run("--module", "softhsm2")  # p11-kit's name for SoftHSM
    assert p.returncode == 0, describe(p)
    assert "already initialized" in out(p), describe(p)


def test_without_softhsm2_conf_a_config_is_made_in_softhsm_dir(hsm):
    work = hsm.root / "work"
    work.mkdir()
    p = hsm.run("--softhsm-dir", "sh", unset=["SOFTHSM2_CONF"], cwd=work)
    assert p.returncode == 0, describe(p)

    made = work / "sh"
    conf = made / "softhsm2.conf"
    assert conf.is_file()
    assert (made / "tokens").is_dir()
    assert f"directories.tokendir = {made / 'tokens'}" in conf.read_text().splitlines()
    assert "@TOKENDIR@" not in conf.read_text()
    assert p.stdout.strip().splitlines()[-1] == f"export SOFTHSM2_CONF={conf}"

    assert hsm.token(conf=conf) is not None
    assert hsm.token() is None  # not in the fixture's own token directory

    # Same again: the config is rendered again, the token is left as it is.
    p = hsm.run("--softhsm-dir", "sh", unset=["SOFTHSM2_CONF"], cwd=work)
    assert p.returncode == 0, describe(p)
    assert "already initialized" in out(p), describe(p)
    assert p.stdout.strip().splitlines()[-1] == f"export SOFTHSM2_CONF={conf}"
