"""compose.yaml, the Dockerfiles and the Grafana dashboard, cross-checked against the code.

No Docker engine is needed: the files are parsed and every name they use (modules, settings,
files on disk, services, volumes, Dockerfile stages and build args) is looked up. When a
`docker compose` CLI happens to be installed, ``docker compose config`` validates the file too.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from fnmatch import fnmatch
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DASHBOARD_FILE = ROOT / "docs" / "grafana" / "reasonq.json"

# Values for the variables compose.yaml interpolates; FLOWER_BASIC_AUTH is required there.
COMPOSE_VARS = {"FLOWER_BASIC_AUTH": "admin:secret", "HF_TOKEN": ""}

REQUIRED = {
    "redis",
    "api",
    "worker-cpu",
    "worker-gpu",
    "vllm",
    "ollama",
    "ollama-init",
    "flower",
    "model-init",
}
ONE_SHOTS = {"model-init", "ollama-init"}
GPU_SERVICES = {"vllm", "worker-gpu"}
WORKERS = {"worker-cpu": "cpu", "worker-gpu": "gpu"}
HEAVY = ("onnxruntime", "transformers", "torch")
VLLM_FLAGS = {
    "--model": "microsoft/Phi-4-mini-instruct",
    "--max-model-len": "8192",
    "--max-num-seqs": "8",
    "--gpu-memory-utilization": "0.8",
    "--tool-call-parser": "phi4_mini_json",
}
VLLM_SWITCHES = ("--enable-auto-tool-choice", "--trust-remote-code")

# metric -> labels it carries (workers/metrics.py, the API's queue-depth gauge).
METRICS = {
    "reasonq_queue_depth": {"queue"},
    "reasonq_jobs_total": {"status", "runtime"},
    "reasonq_queue_wait_seconds": {"runtime"},
    "reasonq_time_to_first_token_seconds": {"runtime"},
    "reasonq_run_seconds": {"runtime"},
    "reasonq_tokens_generated_total": {"runtime"},
    "reasonq_backend_errors_total": {"runtime", "code"},
    "reasonq_retries_total": {"runtime"},
}
HISTOGRAMS = {"reasonq_queue_wait_seconds", "reasonq_time_to_first_token_seconds",
              "reasonq_run_seconds"}  # fmt: skip


# --- helpers -----------------------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<esc>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_]\w*))"
)


def interpolate(value: str, env: Mapping[str, str] = COMPOSE_VARS) -> str:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?msg}."""

    def substitute(m: re.Match) -> str:
        if m["esc"]:
            return "$"
        name, op, arg = m["braced"] or m["named"], m["op"], m["arg"]
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise KeyError(f"required variable {name} is unset: {arg}")
        if (op == ":-" and not value) or (op == "-" and value is None):
            return arg
        return value or ""

    return _VAR.sub(substitute, value)


def environment(service: dict, env: Mapping[str, str] = COMPOSE_VARS) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {k: interpolate(str(v), env) for k, v in raw.items()}


def command(service: dict, key: str = "command") -> list[str]:
    raw = service.get(key) or []
    return shlex.split(raw) if isinstance(raw, str) else [str(part) for part in raw]


def healthcheck_command(service: dict) -> str:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return interpolate(test)
    return interpolate(" ".join(test[1:]))


def flag_value(argv: list[str], *flags: str) -> str | None:
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def dockerfile(service: dict) -> Path:
    build = service["build"]
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, comments dropped, continuations joined."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def host_ports(service: dict) -> list[str]:
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.append(str(entry.get("published", "")))
            continue
        parts = interpolate(str(entry)).split(":")
        ports.append(parts[-2] if len(parts) >= 2 else "")
    return ports


def volume_sources(service: dict) -> list[str]:
    out = []
    for entry in service.get("volumes", []):
        out.append(entry["source"] if isinstance(entry, dict) else str(entry).split(":")[0])
    return out


def depends_on(service: dict) -> dict[str, str]:
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def parse_duration(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- services ----------------------------------------------------------------------------


def test_required_services_exist():
    assert REQUIRED <= SERVICES.keys(), REQUIRED - SERVICES.keys()


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_has_an_image_or_a_buildable_dockerfile(name):
    service = SERVICES[name]
    assert "image" in service or "build" in service
    if "build" not in service:
        return
    build = service["build"]
    assert (ROOT / build.get("context", ".")).is_dir()
    path = dockerfile(service)
    assert path.is_file(), path
    steps = instructions(path)
    stages = {m[1] for kind, rest in steps if kind == "FROM"
              for m in [re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)] if m}  # fmt: skip
    if "target" in build:
        assert build["target"] in stages, f"{name}: no stage {build['target']} in {path.name}"
    declared = {rest.split("=")[0].strip() for kind, rest in steps if kind == "ARG"}
    for arg in build.get("args") or {}:
        assert arg in declared, f"{name}: build arg {arg} is not an ARG of {path.name}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_bind_mounted_files_exist(name):
    for source in volume_sources(SERVICES[name]):
        if source.startswith((".", "/")):
            assert (ROOT / source).resolve().exists(), f"{name}: {source} does not exist"


def test_named_volumes_are_declared_and_used():
    declared = set(COMPOSE.get("volumes") or {})
    used = {src for s in SERVICES.values() for src in volume_sources(s)
            if not src.startswith((".", "/"))}  # fmt: skip
    assert used <= declared, used - declared
    assert declared <= used, f"declared but unused: {declared - used}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_reasonq_env_vars_are_settings_fields_and_validate(name, monkeypatch):
    env = {k: v for k, v in environment(SERVICES[name]).items() if k.startswith("REASONQ_")}
    fields = Settings.model_fields
    unknown = [k for k in env if k.removeprefix("REASONQ_").lower() not in fields]
    assert not unknown, f"{name}: not settings fields: {unknown}"
    for key in list(os.environ):
        if key.startswith("REASONQ_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # raises ValidationError on a bad value
    read = {f"REASONQ_{field.upper()}" for field in settings.model_fields_set}
    assert read == set(env), f"{name}: settings ignored {set(env) - read}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_depends_on_targets_exist_and_conditions_hold(name):
    service = SERVICES[name]
    for target, condition in depends_on(service).items():
        assert target in SERVICES, f"{name} depends on unknown {target}"
        dep = SERVICES[target]
        # A dependency must be started whenever its dependant is.
        assert set(dep.get("profiles", [])) <= set(service.get("profiles", [])), (name, target)
        if condition == "service_healthy":
            assert "healthcheck" in dep, f"{name} waits for {target} to be healthy: no healthcheck"
            assert not dep["healthcheck"].get("disable"), target
        elif condition == "service_completed_successfully":
            restart = str(dep.get("restart", "no"))
            assert restart == "no" or restart.startswith("on-failure"), (
                f"{target} is a one-shot but restart: {restart} would loop"
            )
        else:
            assert condition == "service_started", condition


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_restart_policy_and_healthcheck(name):
    service = SERVICES[name]
    if name in ONE_SHOTS:
        assert str(service.get("restart", "no")) == "no"
        assert command(service) or command(service, "entrypoint"), f"{name} runs nothing"
    else:
        assert service.get("restart") == "unless-stopped", name
        assert "healthcheck" in service, f"{name} has no healthcheck"


def test_api_command_resolves_to_the_app_factory():
    argv = command(SERVICES["api"])
    assert argv[0] == "uvicorn" and "--factory" in argv
    target = next(a for a in argv[1:] if ":" in a and not a.startswith("-"))
    module, attr = target.split(":")
    assert module_file(module) is not None, f"{module} has no module file"
    try:
        loaded = importlib.import_module(module)
    except ImportError as exc:  # a dependency missing here, not in the image
        pytest.skip(f"{module} not importable here: {exc}")
    assert callable(getattr(loaded, attr)), target
    healthcheck = healthcheck_command(SERVICES["api"])
    assert "/healthz" in healthcheck and "8000" in healthcheck


@pytest.mark.parametrize("name", ["worker-cpu", "worker-gpu", "flower"])
def test_celery_app_module_exists(name):
    argv = command(SERVICES[name])
    assert argv[:2] == ["celery", "-A"], argv
    assert module_file(argv[2]) is not None, f"{name}: {argv[2]} has no module file"


def test_model_init_runs_a_real_cli_command():
    from core.cli import COMMANDS

    argv = command(SERVICES["model-init"])
    assert argv[:2] == ["reasonq", "fetch-default-model"]
    assert PYPROJECT["scripts"]["reasonq"] == "core.cli:main"
    assert module_file(COMMANDS["fetch-default-model"][0]) is not None


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_consumes_its_queue_and_is_pinged_by_name(name):
    queue = WORKERS[name]
    service = SERVICES[name]
    argv = command(service)
    assert argv[3] == "worker" and "-E" in argv
    assert flag_value(argv, "-Q", "--queues") == queue
    assert flag_value(argv, "-n", "--hostname") == f"{queue}@%h"
    ping = healthcheck_command(service)
    assert "inspect ping" in ping and f"{queue}@$HOSTNAME" in ping, ping
    assert "container_name" not in service and not service.get("ports"), "must scale"


def test_routing_is_the_same_everywhere_and_every_queue_has_a_worker():
    routing = {
        name: json.loads(environment(SERVICES[name])["REASONQ_RUNTIME_QUEUES"])
        for name in ("api", "flower", *WORKERS)
    }
    assert len({json.dumps(r, sort_keys=True) for r in routing.values()}) == 1, routing
    queues = routing["api"]
    assert queues == {"onnx": "cpu", "ollama": "cpu", "vllm": "gpu"}
    assert set(queues.values()) == set(WORKERS.values())


def test_worker_runtime_endpoints():
    cpu, gpu = environment(SERVICES["worker-cpu"]), environment(SERVICES["worker-gpu"])
    assert cpu["REASONQ_OLLAMA_URL"] == "http://ollama:11434"
    assert gpu["REASONQ_VLLM_URL"] == "http://vllm:8000"
    assert gpu["REASONQ_VLLM_MODEL"] == VLLM_FLAGS["--model"]
    assert gpu["REASONQ_ONNX_PROVIDER"] == "cuda"
    assert cpu.get("REASONQ_ONNX_PROVIDER", "auto") in ("cpu", "auto")


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_reads_the_model_volume_model_init_writes(name):
    service = SERVICES[name]
    data_dir = environment(service)["REASONQ_DATA_DIR"]
    init_mount = next(v for v in SERVICES["model-init"]["volumes"] if v.startswith("models:"))
    assert init_mount == f"models:{environment(SERVICES['model-init'])['REASONQ_DATA_DIR']}"
    assert f"models:{data_dir}:ro" in service["volumes"]
    assert depends_on(service)["model-init"] == "service_completed_successfully"


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_stop_grace_covers_the_job_deadline(name):
    service = SERVICES[name]
    deadline = float(environment(service).get("REASONQ_JOB_DEADLINE_S",
                                              Settings.model_fields["job_deadline_s"].default))  # fmt: skip
    assert parse_duration(service["stop_grace_period"]) >= deadline


def test_vllm_command_carries_the_seed_flags():
    service = SERVICES["vllm"]
    assert service["image"].startswith("vllm/vllm-openai")
    argv = command(service)
    for flag, value in VLLM_FLAGS.items():
        assert flag_value(argv, flag) == value, flag
    for switch in VLLM_SWITCHES:
        assert switch in argv, switch
    assert "/health" in healthcheck_command(service)
    assert "HF_TOKEN" in environment(service)
    assert any(v.startswith("hf-cache:") for v in service["volumes"])


def _reserves_gpu(service: dict) -> bool:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return any("gpu" in d.get("capabilities", []) for d in devices.get("devices", []))


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_only_gpu_profile_services_reserve_a_gpu(name):
    service = SERVICES[name]
    in_gpu_profile = "gpu" in service.get("profiles", [])
    assert in_gpu_profile == (name in GPU_SERVICES), name
    assert _reserves_gpu(service) == in_gpu_profile, name


def test_redis_is_durable():
    service = SERVICES["redis"]
    argv = command(service)
    assert argv[0] == "redis-server"
    assert flag_value(argv, "--appendonly") == "yes"
    assert flag_value(argv, "--appendfsync") == "always"
    assert flag_value(argv, "--maxmemory-policy") in (None, "noeviction")
    assert any(v.endswith(":/data") for v in service["volumes"])
    assert "redis-cli ping" in healthcheck_command(service)


def test_ollama_settings_and_healthcheck():
    service = SERVICES["ollama"]
    env = environment(service)
    assert env["OLLAMA_NUM_PARALLEL"] == "4"
    assert env["OLLAMA_MAX_LOADED_MODELS"] == "1"
    assert env["OLLAMA_FLASH_ATTENTION"] == "1"
    assert "ollama list" in healthcheck_command(service)  # GET /api/tags; no curl in the image


def test_ollama_init_script_and_modelfiles():
    script = ROOT / "docker" / "ollama-init.sh"
    entry = command(SERVICES["ollama-init"], "entrypoint")
    assert any(arg.endswith("ollama-init.sh") for arg in entry)
    if shutil.which("sh"):
        assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    assert "ollama pull" in text and "ollama create" in text
    expected = {"phi4-mini-reasoning": ("0.3", "0.8"), "phi4-mini-coder": ("0.5", "0.9")}
    for variant, (temperature, top_p) in expected.items():
        assert variant in text
        modelfile = (ROOT / "docker" / "ollama" / f"{variant}.Modelfile").read_text()
        assert re.search(r"^FROM phi4-mini$", modelfile, re.MULTILINE)
        assert re.search(rf"^PARAMETER temperature {temperature}$", modelfile, re.MULTILINE)
        assert re.search(rf"^PARAMETER top_p {top_p}$", modelfile, re.MULTILINE)
        assert re.search(r'^SYSTEM """.+"""', modelfile, re.MULTILINE | re.DOTALL)


def test_flower_requires_basic_auth():
    service = SERVICES["flower"]
    raw = service["environment"]["FLOWER_BASIC_AUTH"]
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?.+\}", raw), raw
    with pytest.raises(KeyError):
        environment(service, env={})
    assert environment(service)["FLOWER_BASIC_AUTH"] == COMPOSE_VARS["FLOWER_BASIC_AUTH"]
    assert "/healthcheck" in healthcheck_command(service)


def test_api_enables_auth():
    assert environment(SERVICES["api"])["REASONQ_AUTH_ENABLED"] == "true"


def test_published_host_ports_are_unique():
    ports = [port for s in SERVICES.values() for port in host_ports(s)]
    assert all(ports), "publish with an explicit host port"
    assert len(ports) == len(set(ports)), ports
    assert "8000" in ports


# --- images ------------------------------------------------------------------------------


def _installs(path: Path) -> str:
    return " ".join(rest for kind, rest in instructions(path) if kind == "RUN")


def test_api_image_has_no_model_runtimes():
    for name in ("api", "flower"):
        path = dockerfile(SERVICES[name])
        assert path == ROOT / "docker" / "api.Dockerfile"
        assert not SERVICES[name]["build"].get("args"), "the API image takes no extras"
        runs = _installs(path)
        assert "pip install" in runs
        assert not re.search(r"\.\[", runs), "the API image installs no extras"
        assert "optional-dependencies" not in runs
        for package in HEAVY:
            assert package not in runs, package
    base = " ".join(PYPROJECT["dependencies"])
    for package in HEAVY:
        assert package not in base, f"{package} is a base dependency: it would reach the API"


@pytest.mark.parametrize(
    ("name", "wanted", "forbidden"),
    [("worker-cpu", "cpu", "gpu"), ("worker-gpu", "gpu", "cpu"), ("model-init", "cpu", "gpu")],
)
def test_worker_images_install_one_onnxruntime(name, wanted, forbidden):
    args = SERVICES[name]["build"]["args"]
    extras = set(args["EXTRAS"].split(","))
    assert extras <= PYPROJECT["optional-dependencies"].keys()
    assert wanted in extras and forbidden not in extras
    assert args["FLAVOR"] == wanted


def test_model_init_image_has_the_convert_extra():
    path = dockerfile(SERVICES["model-init"])
    steps = instructions(path)
    target = SERVICES["model-init"]["build"]["target"]
    start = next(i for i, (k, rest) in enumerate(steps)
                 if k == "FROM" and rest.endswith(f"AS {target}"))  # fmt: skip
    stage = " ".join(rest for kind, rest in steps[start + 1 :] if kind == "RUN")
    assert '["convert"]' in stage and "pip install" in stage


@pytest.mark.parametrize("path", ["docker/api.Dockerfile", "docker/worker.Dockerfile"])
def test_dockerfile_copies_exist_and_are_not_dockerignored(path):
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for kind, rest in instructions(ROOT / path):
        if kind == "COPY" and "--from" not in rest:
            *sources, _ = [arg for arg in rest.split() if not arg.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"{path}: COPY {source}: not in the repo"
                assert not any(fnmatch(source, pattern) for pattern in ignored), source
        if kind == "ENV":
            for key in re.findall(r"\b(REASONQ_\w+)=", rest):
                assert key.removeprefix("REASONQ_").lower() in Settings.model_fields, key
    packages = {p.rstrip("*") for p in (
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
        ["find"]["include"])}  # fmt: skip
    copied = {rest.split()[0] for kind, rest in instructions(ROOT / path) if kind == "COPY"}
    assert packages <= copied, f"{path} misses packages {packages - copied}"


def test_docs_name_only_real_settings():
    text = (ROOT / "docs" / "deployment.md").read_text()
    names = set(re.findall(r"\bREASONQ_([A-Z0-9_]+)\b", text))
    assert names, "docs/deployment.md names no settings"
    unknown = sorted(n for n in names if n.lower() not in Settings.model_fields)
    assert not unknown, unknown


def test_docker_compose_config_validates():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI")
    if (
        subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode
        != 0
    ):
        pytest.skip("no docker compose plugin")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "--profile", "gpu", "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **COMPOSE_VARS},
    )
    assert result.returncode == 0, result.stderr


# --- Grafana -----------------------------------------------------------------------------

# PromQL keywords and aggregation operators (`sum by (x) (...)` puts no "(" after `sum`).
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar",
    "topk", "bottomk", "quantile", "count_values",
}  # fmt: skip


def _exprs(dashboard: dict) -> list[str]:
    out = []
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        out.extend(t["expr"] for t in panel.get("targets", []))
    return out


def _metrics_and_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, labels matched in its selector) for each series an expression reads."""
    found = []
    bare = re.sub(r"\[[^\]]*\]", "", re.sub(r'"[^"]*"', '""', expr))  # no strings, no ranges
    for m in re.finditer(r"([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?", bare):
        name, selector = m.group(1), m.group(2) or ""
        before, after = bare[: m.start()], bare[m.end() :]
        if name in _PROMQL_WORDS or after.lstrip().startswith("("):
            continue  # a keyword or a function
        if re.search(r"\b(by|without|on|ignoring)\s*\([^)]*$", before):
            continue  # a label in a grouping clause
        if re.search(r"[{,]\s*$", before) or re.search(r"\{[^}]*$", before):
            continue  # a label inside a selector
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
        found.append((name, labels))
    return found


def test_dashboard_uses_only_known_metrics_and_labels():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs = _exprs(dashboard)
    assert exprs
    used = set()
    for expr in exprs:
        series = _metrics_and_labels(expr)
        assert series, f"no metric in {expr!r}"
        for name, labels in series:
            base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in METRICS else name
            assert base in METRICS, f"unknown metric {name} in {expr!r}"
            assert name == base or base in HISTOGRAMS, name
            assert labels <= METRICS[base], f"{name}: labels {labels - METRICS[base]}"
            grouping = re.findall(r"\bby\s*\(([^)]*)\)", expr)
            for group in grouping:
                extra = {"le"} if name.endswith("_bucket") else set()
                assert {g.strip() for g in group.split(",")} <= METRICS[base] | extra, expr
            used.add(base)
    assert used == set(METRICS), f"no panel for {set(METRICS) - used}"
    for histogram in HISTOGRAMS:
        quantiles = {
            q
            for e in exprs
            if f"{histogram}_bucket" in e
            for q in re.findall(r"histogram_quantile\(\s*([\d.]+)", e)
        }
        assert {"0.5", "0.95", "0.99"} <= quantiles, histogram


def test_dashboard_datasource_is_templated():
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = next(v for v in variables.values() if v["type"] == "datasource")
    assert source["query"] == "prometheus"
    ref = f"${{{source['name']}}}"
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == ref, panel["title"]
        for target in panel["targets"]:
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in variables, f"{panel['title']}: ${var} is not a dashboard variable"
