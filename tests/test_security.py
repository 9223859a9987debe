"""Security: the monitor's API fuzzed, ids that cannot escape the bank, no unpickling, no leaked secrets.

* (a) schemathesis generates requests from the monitor's own ``/openapi.json`` (valid and
  invalid ones) against a filled bank: no 5xx, and every answer conforms to the schema.
  Schemathesis' pytest plugin does not run under pytest 9 (``Function._nodeid``), so the
  operations are driven with Hypothesis directly, a bounded number of examples each.
* (b) crafted image ids (traversal, key separators, globs, control characters) answer 404
  or 422 and reach no other Redis key (checked with Redis ``MONITOR``) and no file.
* (c) the code base (``qualiteacher/``, ``services/``, ``pipelines/``) never unpickles:
  no pickle/marshal/shelve/dill imports, ``torch.load`` only with ``weights_only=True``,
  ``yaml`` only through ``safe_load``, no ``eval``/``exec``, ``np.load`` without pickles.
* (d) a real training run against a Redis with a password: the password appears in no log
  record, no captured output, no Ray worker log and no file of the run folder
  (``summary.json`` included).
"""

from __future__ import annotations

import ast
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.monitor import create_app
from qualiteacher.services.redis_server import EmbeddedRedis, free_port
from tests.redis_fixtures import unique_prefix
from tests.test_monitor import fill_bank, fill_training

REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = ("qualiteacher", "services", "pipelines")
EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def filled(redis_server):
    bank = MemoryBank(redis_server.client(), prefix=unique_prefix(), top_k=3)
    made = fill_bank(bank, n_images=4)
    fill_training(bank.client, bank.prefix, steps=10)
    yield bank, made
    bank.clear()
    bank.client.close()


# ---------------------------------------------------------------------------- (a) fuzzing
def test_openapi_fuzz_no_server_errors(filled, redis_server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.core.failures import FailureGroup

    bank, made = filled
    app = create_app(redis_server.url, prefix=bank.prefix)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    real_id = next(iter(made))
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    calls = 0
    t0 = time.monotonic()

    def fuzz(label: str, strategy) -> None:
        @given(case=strategy)
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            nonlocal calls
            calls += 1
            try:
                response = case.call_and_validate()  # every default check, 5xx included
            except FailureGroup as exc:
                failures.append(f"{label}: {exc}")
                return
            statuses.setdefault(label, set()).add(response.status_code)

        try:
            run()
        except Unsatisfiable:  # no invalid request exists for an operation without parameters
            pass

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    for op in operations:
        for mode in schemathesis.GenerationMode:
            fuzz(f"{op.label} [{mode.value}]", op.as_strategy(mode))
        if "{image_id}" in op.path:  # and with an id that exists, so that ranks and sizes hit real PNGs
            fuzz(f"{op.label} [{real_id}]", op.as_strategy(path_parameters={"image_id": real_id}))
        if "{name}" in op.path:  # and a probe that exists
            fuzz(f"{op.label} [7]", op.as_strategy(path_parameters={"name": "7"}))
    elapsed = time.monotonic() - t0
    print(f"schemathesis: {calls} requests over {len(operations)} operations in {elapsed:.1f} s")
    assert not failures, "\n\n".join(failures[:5])
    assert all(code < 500 for codes in statuses.values() for code in codes), statuses
    assert 200 in statuses[f"GET /bank/images/{{image_id}}/entries/{{rank}}.png [{real_id}]"]  # reached real data
    assert 200 in statuses["GET /api/training/probe/{name}.png [7]"]


# ---------------------------------------------------------------------------- (b) ids
CRAFTED_IDS = [
    "../secret", "..", ".", "a/../../secret", "SECRET_PREFIX:secret", "x:..:secret", "e:x:y", "*", "a*", "?",
    "[a-z]", "{x}", "a b", "a\r\nFLUSHALL", "a\x00b", "%00", "ａ", "é", "x" * 129, "-x", ".hidden", "a:b",
    "etc/passwd", "/etc/passwd", "..\\..\\secret", "nope", "a..b",
]


def _redis_monitor(server: EmbeddedRedis, stop_token: str, seen: list[str], ready: threading.Event) -> None:
    client = server.client()
    with client.monitor() as m:
        ready.set()
        for command in m.listen():
            seen.append(command["command"])
            if stop_token in command["command"]:
                break
    client.close()


def test_image_ids_reach_no_other_key_or_file(filled, redis_server):
    bank, made = filled
    secret_value = f"secret-{uuid.uuid4().hex}"
    other_keys = [f"{bank.prefix}:secret", "secret", "e:x:y", f"other{uuid.uuid4().hex[:6]}:e:x:y"]
    raw = redis_server.client()
    for key in other_keys:
        raw.set(key, secret_value)
    seen: list[str] = []
    ready, stop_token = threading.Event(), f"stop-{uuid.uuid4().hex}"
    watcher = threading.Thread(target=_redis_monitor, args=(redis_server, stop_token, seen, ready), daemon=True)
    watcher.start()
    assert ready.wait(10)
    try:
        with TestClient(create_app(redis_server.url, prefix=bank.prefix)) as api:
            for image_id in CRAFTED_IDS:
                image_id = image_id.replace("SECRET_PREFIX", bank.prefix)
                q = quote(image_id, safe="").replace(".", "%2E")  # else the client resolves "." and ".."
                for path in (f"/bank/images/{q}", f"/bank/images/{q}/entries/0.png", f"/bank/images/{q}/input.png",
                             f"/bank/images/{q}/entries/0.png?size=32"):
                    r = api.get(path)
                    assert r.status_code in (404, 422), (image_id, path, r.status_code)
                    assert r.headers["content-type"].startswith("application/json"), (image_id, path)
                    body = r.text
                    assert secret_value not in body and "root:x:0:0" not in body and "def create_app" not in body
            # A real id still works through the same client (the watcher sees real traffic too).
            assert api.get(f"/bank/images/{next(iter(made))}/entries/0.png").status_code == 200
    finally:
        raw.echo(stop_token)
        watcher.join(10)
        for key in other_keys:
            raw.delete(key)
        raw.close()
    traffic = "\n".join(seen)
    assert f" {bank.prefix}:e:{next(iter(made))}:" in traffic  # MONITOR did record the monitor's reads
    for command in seen:
        for arg in command.split()[1:]:
            assert arg not in other_keys, command
            if ":" in arg:  # anything key-like stays inside the bank's own prefix
                assert arg.startswith(f"{bank.prefix}:"), command
    upper = traffic.upper()
    assert "FLUSHALL" not in upper and "KEYS " not in upper and "FLUSHDB" not in upper  # the CRLF id never got there


# ---------------------------------------------------------------------------- (c) no unpickling
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Places in ``source`` that could unpickle or evaluate data."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "yaml", "numpy"):
            found += [f"{where}: from {node.module} import {a.name} (call it qualified)" for a in node.names
                      if a.name in ("load", "unsafe_load", "full_load", "load_all")]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in ("eval", "exec", "builtins.eval", "builtins.exec", "__import__"):
            found.append(f"{where}: {name}()")
        elif name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name.startswith("yaml.") and last in ("load", "load_all", "unsafe_load", "full_load", "full_load_all"):
            loader = _dotted(_kw(node, "Loader") or ast.Name("missing"))
            if last in ("load", "load_all") and loader.rsplit(".", 1)[-1] in ("SafeLoader", "CSafeLoader"):
                continue
            found.append(f"{where}: {name} (use yaml.safe_load)")
        elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is not None \
                and not (isinstance(_kw(node, "allow_pickle"), ast.Constant) and _kw(node, "allow_pickle").value is False):
            found.append(f"{where}: {name} with allow_pickle")
        elif name in ("pd.read_pickle", "pandas.read_pickle"):
            found.append(f"{where}: {name}")
    return found


def test_unsafe_call_detector_works():
    bad = ("import pickle\nfrom dill import loads\nimport torch, yaml, numpy as np\n"
           "torch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(s)\nyaml.load(s, Loader=yaml.Loader)\n"
           "yaml.unsafe_load(s)\neval('1')\nexec('x=1')\nnp.load(p, allow_pickle=True)\nfrom torch import load\n")
    assert len(unsafe_calls(bad, "bad.py")) == 11  # every line but the third
    good = ("import torch, yaml, numpy as np\ntorch.load(p, map_location='cpu', weights_only=True)\n"
            "yaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\nmodel.eval()\nnp.load(p)\n"
            "np.load(p, allow_pickle=False)\n")
    assert unsafe_calls(good, "good.py") == []


def test_code_base_never_unpickles_or_evaluates():
    files = [p for d in CODE_DIRS for p in sorted((REPO / d).rglob("*.py")) if "_pb2" not in p.name]
    assert len(files) > 30
    found = [hit for p in files for hit in unsafe_calls(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert found == []
    # And the one torch.load of a checkpoint does refuse a pickled object (the runtime side).
    assert any("weights_only=True" in p.read_text() for p in files if p.name == "checkpoint.py")


# ---------------------------------------------------------------------------- (d) secrets
SECRET = "S3cret-" + uuid.uuid4().hex[:12]


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                pass
    return hits


def test_redis_password_never_logged_or_written(ray_cluster, weights_dir, tmp_path, caplog, capfd):
    """The smoke job against a Redis that needs a password, given in ``redis.url``."""
    import ray

    from qualiteacher.pipelines.train import run
    from qualiteacher.pipelines.cli import main
    from qualiteacher.config import load_config

    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), password=SECRET)
    server.start()
    url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
    run_dir = tmp_path / "run"
    started = time.time()
    caplog.set_level(logging.DEBUG)
    try:
        cfg = load_config(REPO / "configs/smoke.yaml", [f"redis.url={url}", "ray.namespace=secret-run",
                                                          "train.steps=4", "labelling.teachers=1"])
        summary = run(cfg, run_dir)
        assert summary["steps"] == 4 and summary["bank_images"] > 0
        # The CLI tools that take the URL say where they connect, without the password.
        assert main(["bank", "check", "--redis", url]) == 0
    finally:
        server.stop()
    out, err = capfd.readouterr()
    records = "\n".join(f"{r.name}: {r.getMessage()} {r.args!r}" for r in caplog.records)
    assert SECRET not in out and SECRET not in err
    assert f"redis://:***@127.0.0.1:{server.port}/0: " in out  # bank check names the Redis, redacted
    assert SECRET not in records
    assert "redis://:***@127.0.0.1" in records  # the URL was logged, redacted
    summary_text = (run_dir / "summary.json").read_text()
    assert SECRET not in summary_text and json.loads(summary_text)["steps"] == 4
    assert _files_containing(run_dir, SECRET.encode()) == []
    assert _files_containing(tmp_path / "redis", SECRET.encode()) == []
    # Ray's worker logs (actors, the Ray Train workers) of this session, written since the start.
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    recent = [p for p in logs_dir.rglob("*") if p.is_file() and p.stat().st_mtime >= started - 1]
    assert recent, logs_dir
    assert [str(p) for p in recent if SECRET.encode() in p.read_bytes()] == []
