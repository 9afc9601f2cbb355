"""Runs a doc's ```sh examples, in order, in one bash shell against a real server.

Shared by the docs-example tests of the keyring and Kong pages. Each ```sh block is one example;
a ```json block right after it (with no heading between) is the documented answer, whose keys
and JSON types must match the real one. curl is wrapped so every HTTP status an example gets is
recorded; run() returns, per example, its code, its documented sample, its stdout and its list
of statuses, and leaves the asserts to the test.
"""

import json
import os
import re
import subprocess
import tempfile

FENCE_RE = re.compile(r"^```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


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


def run(doc_path, server, prefix, in_tmp=None):
    """Runs every example of doc_path with $P11KMS_ADDR and $TOKEN set, in a fresh temp dir as
    the working directory (in_tmp(tmp) is called before it is removed). Returns a list of
    (code, sample, stdout, statuses)."""
    with open(doc_path, encoding="utf-8") as f:
        exs = examples(f.read())
    lines = ["curl() { command curl -q --max-time 20 -w '%{stderr}@@HTTP %{http_code}@@\\n' \"$@\"; }"]
    for i, (code, _) in enumerate(exs):
        lines += ["printf '@@BEGIN %d@@\\n'; printf '@@BEGIN %d@@\\n' >&2" % (i, i), code.rstrip("\n"),
                  "printf '\\n@@END %d@@\\n'; printf '@@END %d@@\\n' >&2" % (i, i)]
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        path = os.path.join(tmp, "examples.sh")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8", "P11KMS_ADDR": server.url,
               "TOKEN": server.token}
        out = subprocess.run(["bash", "--noprofile", "--norc", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        if in_tmp is not None:
            in_tmp(tmp)
    stdout, stderr = out.stdout.decode(), out.stderr.decode()
    results = []
    for i, (code, sample) in enumerate(exs):
        o = re.search(r"@@BEGIN %d@@\n(.*?)\n@@END %d@@" % (i, i), stdout, re.S).group(1).strip()
        e = re.search(r"@@BEGIN %d@@\n(.*?)@@END %d@@" % (i, i), stderr, re.S).group(1)
        results.append((code, sample, o, [int(s) for s in re.findall(r"@@HTTP (\d{3})@@", e)]))
    return results
