"""deploy/: every file parses, every kvrelay config in it loads through the real schema, and the
manifests keep their security and lifecycle promises (router port only, grpc probes, Ray token
auth, GPU worker groups, a grace period longer than the drain)."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvrelay.cli import build_parser
from kvrelay.cluster.config import ServerConfig, load_config
from kvrelay.cluster.serve import config_from_args

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay.yaml"
LAUNCHER = DEPLOY / "ray-cluster.aws.yaml"
HEAD_SCRIPT = DEPLOY / "kvrelay-head.sh"
COLOCATED = DEPLOY / "config.colocated.yaml"
DISAGGREGATED = DEPLOY / "config.disaggregated.yaml"
# GCS, dashboard, client server: reaching any of them is running code on the cluster.
RAY_PORTS = (6379, 8265, 10001)
NON_ROOT = {"kvrelay", "1000", "1000:1000"}


# ---- helpers ---------------------------------------------------------------------------------
def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def kind(docs: list[dict[str, Any]], k: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == k]


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments and blank lines dropped, `\\` lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
    assert not pending, "a Dockerfile ends inside a line continuation"
    return out


def dockerfile_problems(instructions: list[tuple[str, str]]) -> list[str]:
    problems = []
    if not instructions or instructions[0][0] != "FROM":
        problems.append("the first instruction is not FROM")
    last_from = max((i for i, (ins, _) in enumerate(instructions) if ins == "FROM"), default=0)
    final = instructions[last_from:]
    users = [args for ins, args in final if ins == "USER"]
    if not users or users[-1] in ("root", "0", "0:0"):
        problems.append("the final stage does not switch to a non-root USER")
    if not any(ins in ("ENTRYPOINT", "CMD") for ins, _ in final):
        problems.append("no ENTRYPOINT or CMD")
    exposed = {int(p.split("/")[0]) for ins, args in final if ins == "EXPOSE" for p in args.split()}
    problems += [f"EXPOSE {p}: a Ray port" for p in sorted(exposed & set(RAY_PORTS))]
    return problems


def service_problems(service: dict[str, Any], allowed: set[int]) -> list[str]:
    ports = service["spec"]["ports"]
    problems = [
        f"port {p['port']} is not one of {sorted(allowed)}" for p in ports if p["port"] not in allowed
    ]
    problems += [
        f"targetPort {p.get('targetPort', p['port'])} != port {p['port']}"
        for p in ports
        if p.get("targetPort", p["port"]) != p["port"]
    ]
    return problems


def ingress_problems(policy: dict[str, Any], cluster: str, open_ports: set[int]) -> list[str]:
    """A rule may open every port only to this RayCluster's pods; other rules only open_ports."""
    problems = []
    own = {"podSelector": {"matchLabels": {"ray.io/cluster": cluster}}}
    for i, rule in enumerate(policy["spec"].get("ingress", [])):
        if rule.get("from") == [own]:
            continue
        ports = rule.get("ports")
        if not ports:
            problems.append(f"ingress[{i}] opens every port to {rule.get('from', 'anyone')}")
            continue
        problems += [f"ingress[{i}] opens {p['port']}" for p in ports if p["port"] not in open_ports]
    return problems


def containers(ray_cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group, pod spec, container) of every Ray container, head first."""
    spec = ray_cluster["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        pod = group["template"]["spec"]
        for c in pod["containers"]:
            yield name, pod, c


def serve_config(command: str, config_paths: dict[str, Path]) -> ServerConfig:
    """The config a `kvrelay serve ...` line would run with, through the real CLI parser."""
    words = shlex.split(command)
    start = words.index("kvrelay")
    args = build_parser().parse_args(words[start + 1 :])
    assert args.command == "serve"
    args.config = config_paths[str(args.config)]
    return config_from_args(args)


@pytest.fixture(scope="module")
def kuberay() -> list[dict[str, Any]]:
    return yaml_docs(KUBERAY)


@pytest.fixture(scope="module")
def kuberay_config(kuberay: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> ServerConfig:
    (config_map,) = kind(kuberay, "ConfigMap")
    path = tmp_path_factory.mktemp("kuberay") / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"], encoding="utf-8")
    return load_config(path)


@pytest.fixture(scope="module")
def ray_cluster(kuberay: list[dict[str, Any]]) -> dict[str, Any]:
    (rc,) = kind(kuberay, "RayCluster")
    return rc


# ---- every file ------------------------------------------------------------------------------
def test_every_file_under_deploy_parses() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {
        "Dockerfile", "kuberay.yaml", "ray-cluster.aws.yaml", "kvrelay-head.sh",
        "config.colocated.yaml", "config.disaggregated.yaml", "kvrelay.example.yaml",
    }  # fmt: skip
    for path in files:
        if path.suffix == ".yaml":
            assert yaml_docs(path), f"{path.name}: no YAML document"
        elif path.name == "Dockerfile":
            assert dockerfile_problems(parse_dockerfile(path.read_text(encoding="utf-8"))) == []
        elif path.suffix == ".sh":
            subprocess.run(["bash", "-n", str(path)], check=True)
        else:
            pytest.fail(f"{path.name}: no check for this kind of file; add one")


def test_every_deploy_file_is_documented() -> None:
    text = (ROOT / "docs" / "DEPLOY.md").read_text(encoding="utf-8")
    missing = [p.name for p in DEPLOY.iterdir() if p.is_file() and f"deploy/{p.name}" not in text]
    assert missing == []


# ---- kvrelay configs -------------------------------------------------------------------------
def test_example_config_still_holds_the_defaults() -> None:
    assert load_config(DEPLOY / "kvrelay.example.yaml") == ServerConfig()


def test_colocated_config() -> None:
    c = load_config(COLOCATED)
    assert (c.host, c.port, c.metrics_port, c.ray_address) == ("0.0.0.0", 50051, 9400, "auto")
    assert (c.device, c.workers, c.prefill_workers, c.decode_workers) == ("cuda", 8, None, None)
    assert c.auth_token_file is None
    assert (c.engine.model, c.engine.dtype) == ("/models/llama-3.1-8b-instruct", "bfloat16")


def test_disaggregated_config() -> None:
    c = load_config(DISAGGREGATED)
    assert (c.workers, c.prefill_workers, c.decode_workers) == (None, 2, 6)
    assert (c.host, c.port, c.device, c.ray_address) == ("0.0.0.0", 50051, "cuda", "auto")
    assert c.engine.block_size == 16


def test_kuberay_config_map(kuberay_config: ServerConfig) -> None:
    c = kuberay_config
    assert (c.host, c.port, c.metrics_port, c.ray_address, c.device) == (
        "0.0.0.0", 50051, 9400, "auto", "cuda",
    )  # fmt: skip
    assert (c.workers, c.drain_grace_s, c.engine.model) == (8, 30.0, "/models/llama-3.1-8b-instruct")


# ---- KubeRay ---------------------------------------------------------------------------------
def test_kuberay_holds_the_expected_objects(kuberay: list[dict[str, Any]]) -> None:
    assert [(d["kind"], d["metadata"]["name"]) for d in kuberay] == [
        ("ConfigMap", "kvrelay-config"),
        ("RayCluster", "kvrelay"),
        ("Service", "kvrelay"),
        ("Service", "kvrelay-metrics"),
        ("NetworkPolicy", "kvrelay"),
    ]
    assert not kind(kuberay, "Secret"), "the Ray token must come from a Secret made outside git"


def test_services_expose_the_router_port_only(
    kuberay: list[dict[str, Any]], kuberay_config: ServerConfig
) -> None:
    assert kuberay_config.metrics_port is not None
    router, metrics = kind(kuberay, "Service")
    assert [p["port"] for p in router["spec"]["ports"]] == [kuberay_config.port]
    assert [p["port"] for p in metrics["spec"]["ports"]] == [kuberay_config.metrics_port]
    assert metrics["spec"]["type"] == "ClusterIP"
    for service in (router, metrics):
        assert service_problems(service, {kuberay_config.port, kuberay_config.metrics_port}) == []
        assert service["spec"]["selector"] == {"ray.io/cluster": "kvrelay", "ray.io/node-type": "head"}


def test_service_check_catches_ray_ports() -> None:
    bad = {"spec": {"ports": [{"port": 50051}, {"port": 8265}, {"port": 80, "targetPort": 50051}]}}
    assert service_problems(bad, {50051, 80}) == [
        "port 8265 is not one of [80, 50051]",
        "targetPort 50051 != port 80",
    ]


def test_ray_head_service_stays_internal(ray_cluster: dict[str, Any]) -> None:
    assert ray_cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert ray_cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert "enableIngress" not in ray_cluster["spec"]["headGroupSpec"]


def test_network_policy_fences_ray_ports(kuberay: list[dict[str, Any]], kuberay_config: ServerConfig) -> None:
    (policy,) = kind(kuberay, "NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/cluster": "kvrelay"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert ingress_problems(policy, "kvrelay", {kuberay_config.port, 9400}) == []


def test_network_policy_check_catches_open_rules() -> None:
    policy = {
        "spec": {
            "ingress": [
                {"ports": [{"port": 50051}, {"port": 6379}]},
                {"from": [{"namespaceSelector": {}}]},
                {"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": "kvrelay"}}}]},
            ]
        }
    }
    assert ingress_problems(policy, "kvrelay", {50051}) == [
        "ingress[0] opens 6379",
        "ingress[1] opens every port to [{'namespaceSelector': {}}]",
    ]


def test_head_probes_are_grpc_on_the_router_port(
    ray_cluster: dict[str, Any], kuberay_config: ServerConfig
) -> None:
    (head,) = [c for group, _, c in containers(ray_cluster) if group == "head"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert head[probe]["grpc"] == {"port": kuberay_config.port}, probe
        assert set(head[probe]) & {"httpGet", "tcpSocket", "exec"} == set(), probe
    assert {p["containerPort"] for p in head["ports"]} == {kuberay_config.port, kuberay_config.metrics_port}


def test_gpu_worker_groups_hold_the_configured_workers(
    ray_cluster: dict[str, Any], kuberay_config: ServerConfig
) -> None:
    total = 0
    for group in ray_cluster["spec"]["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        gpus = c["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus >= 1 and c["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
        total += group["replicas"] * gpus
    assert total == kuberay_config.workers == 8
    head = ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def prestop_sleep(container: dict[str, Any]) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    return float(command[1])


def test_grace_periods_outlast_the_drain(ray_cluster: dict[str, Any], kuberay_config: ServerConfig) -> None:
    drain = kuberay_config.drain_grace_s
    for group, pod, c in containers(ray_cluster):
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > drain, group
        if group == "head":  # preStop, then SIGTERM starts the drain: both inside the grace
            assert grace > prestop_sleep(c) + drain + 5
        else:  # Ray on a worker pod must still run while the head drains
            assert drain < prestop_sleep(c) < grace


def test_every_ray_container_has_the_token_from_a_secret(ray_cluster: dict[str, Any]) -> None:
    for group, _, c in containers(ray_cluster):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, group
        assert "value" not in env["RAY_AUTH_TOKEN"], group
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "kvrelay-ray-token", "key": "auth_token"}, group


def test_pods_run_as_non_root(ray_cluster: dict[str, Any]) -> None:
    for group, pod, c in containers(ray_cluster):
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, group
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, group


def test_head_execs_kvrelay_serve_on_the_config_map(
    ray_cluster: dict[str, Any], kuberay_config: ServerConfig, tmp_path: Path
) -> None:
    assert ray_cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head_pod = ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (script,) = head_pod["containers"][0]["args"]
    (serve_line,) = [line for line in script.splitlines() if "kvrelay serve" in line]
    assert serve_line.strip().startswith("exec kvrelay serve --ray-address auto --config ")
    # --block removed from KubeRay's `ray start`: Ray daemonizes and kvrelay gets SIGTERM
    assert 'eval "${KUBERAY_GEN_RAY_START_CMD//--block/}"' in script
    mount = {m["name"]: m["mountPath"] for m in head_pod["containers"][0]["volumeMounts"]}["config"]
    (volume,) = [v for v in head_pod["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == "kvrelay-config"
    (kuberay_map,) = kind(yaml_docs(KUBERAY), "ConfigMap")
    config_map = tmp_path / "config.yaml"
    config_map.write_text(kuberay_map["data"]["config.yaml"], encoding="utf-8")
    assert serve_config(serve_line, {f"{mount}/config.yaml": config_map}) == kuberay_config
    for group, _, c in containers(ray_cluster):
        if group != "head":
            assert "KUBERAY_GEN_RAY_START_CMD" in c["args"][0] and "kvrelay" not in c["args"][0]


# ---- Dockerfile ------------------------------------------------------------------------------
def test_dockerfile_parser() -> None:
    text = '# c\nFROM a AS b\n\nRUN x \\\n  && y\nUSER 1000\nENTRYPOINT ["k"]\n'
    assert parse_dockerfile(text) == [
        ("FROM", "a AS b"),
        ("RUN", "x && y"),
        ("USER", "1000"),
        ("ENTRYPOINT", '["k"]'),
    ]
    assert dockerfile_problems(parse_dockerfile("USER root\nFROM a\nEXPOSE 6379/tcp 50051\n")) == [
        "the first instruction is not FROM",
        "the final stage does not switch to a non-root USER",
        "no ENTRYPOINT or CMD",
        "EXPOSE 6379: a Ray port",
    ]


def test_dockerfile(ray_cluster: dict[str, Any]) -> None:
    instructions = parse_dockerfile((DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert all(f.startswith("nvidia/cuda:") for f in froms)
    last = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    final = dict(instructions[last:])  # the last of each instruction in the runtime stage
    assert final["USER"] in NON_ROOT
    assert final["ENTRYPOINT"] == '["kvrelay"]'
    c = load_config(COLOCATED)
    assert final["EXPOSE"].split() == [str(c.port), str(c.metrics_port)]
    args = dict(a.split("=", 1) for ins, a in instructions[last:] if ins == "ARG")
    assert args["RAY_VERSION"] == ray_cluster["spec"]["rayVersion"]
    env = [e for ins, a in instructions[last:] if ins == "ENV" for e in a.split()]
    assert "RAY_AUTH_MODE=token" in env


# ---- Ray cluster launcher --------------------------------------------------------------------
@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    (doc,) = yaml_docs(LAUNCHER)
    return doc


def test_launcher_passes_rays_own_schema(launcher: dict[str, Any]) -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(copy.deepcopy(launcher)))
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["gpu"]["min_workers"] = "two"
    with pytest.raises(Exception, match="'two' is not of type 'integer'"):
        util.validate_config(util.prepare_config(broken))


def test_launcher_starts_ray_with_token_auth_and_a_private_dashboard(launcher: dict[str, Any]) -> None:
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for command in ray_starts:
        assert "RAY_AUTH_MODE=token ray start" in command
        assert "--dashboard-host=0.0.0.0" not in command
    assert "--dashboard-host=127.0.0.1" in ray_starts[0]
    assert launcher["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    (rc,) = kind(yaml_docs(KUBERAY), "RayCluster")
    rc_version = rc["spec"]["rayVersion"]
    assert any(f'"ray[default]=={rc_version}"' in c for c in launcher["setup_commands"])


def test_launcher_security_group_never_opens_ray_ports(launcher: dict[str, Any]) -> None:
    c = load_config(COLOCATED)
    rules = launcher["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(c.port, c.port)]
    for rule in rules:
        assert not any(rule["FromPort"] <= p <= rule["ToPort"] for p in RAY_PORTS)
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule["IpRanges"])


def test_launcher_head_runs_kvrelay_serve_on_the_colocated_config(launcher: dict[str, Any]) -> None:
    head = launcher["head_start_ray_commands"]
    assert head[:2] == ["bash ~/kvrelay/deploy/kvrelay-head.sh --stop", "ray stop"]
    (line,) = [c for c in head if "kvrelay-head.sh" in c and "--stop" not in c]
    words = shlex.split(line)
    assert words[0] == "RAY_AUTH_MODE=token"
    script, config = words[words.index("bash") + 1 : words.index("bash") + 3]
    assert (
        script == "~/kvrelay/deploy/kvrelay-head.sh" and (ROOT / script.removeprefix("~/kvrelay/")).is_file()
    )
    assert config == "~/kvrelay/deploy/config.colocated.yaml"
    text = HEAD_SCRIPT.read_text(encoding="utf-8")
    (serve_line,) = [s for s in text.splitlines() if "kvrelay serve" in s and not s.startswith("#")]
    assert serve_line == 'exec kvrelay serve --ray-address auto --config "$config"'
    assert serve_config(serve_line, {"$config": COLOCATED}) == load_config(COLOCATED)
    # The GPU node type gives the cluster at least the workers the config asks for.
    gpu = launcher["available_node_types"]["gpu"]
    assert gpu["min_workers"] == 2 and launcher["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_head_script_python_compiles() -> None:
    text = HEAD_SCRIPT.read_text(encoding="utf-8")
    match = re.search(r"<<'PY'\n(.*?)\nPY\n", text, re.S)
    assert match is not None
    compile(match.group(1), "kvrelay-head.sh:python", "exec")


def run_head_script(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        ["bash", str(HEAD_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=20
    )


def test_head_script_stop_drains_only_a_kvrelay(tmp_path: Path) -> None:
    assert run_head_script(tmp_path, "--stop").returncode == 0  # nothing started: nothing to do
    # A stale pid file naming some other process: left alone, the pid file goes.
    other = subprocess.Popen(["sleep", "30"])
    kvrelay = subprocess.Popen(["bash", "-c", "exec -a kvrelay-serve sleep 30"])
    try:
        (tmp_path / "kvrelay.pid").write_text(str(other.pid))
        assert run_head_script(tmp_path, "--stop").returncode == 0
        assert other.poll() is None and not (tmp_path / "kvrelay.pid").exists()
        # A kvrelay: SIGTERM, and the script returns only once it is gone.
        (tmp_path / "kvrelay.pid").write_text(str(kvrelay.pid))
        assert run_head_script(tmp_path, "--stop").returncode == 0
        assert kvrelay.wait(timeout=5) == -15
    finally:
        for p in (other, kvrelay):
            p.kill()
            p.wait()


def test_head_script_needs_a_config(tmp_path: Path) -> None:
    result = run_head_script(tmp_path)
    assert result.returncode == 1
    assert "usage: kvrelay-head.sh CONFIG [WAIT_S] | --stop" in result.stderr
