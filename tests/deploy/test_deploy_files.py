"""The files in deploy/: what can be checked without Docker or Kubernetes.

- deploy/dagster.yaml is a valid Dagster 1.13 instance configuration (the suite also runs it
  on a real PostgreSQL: test_deploy_instance.py);
- the Dockerfile copies the product alone, and that copy installs only `certyo_dagster`;
- deploy/values.yaml uses the Helm chart's own key names and sets the same limits as
  deploy/dagster.yaml.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config
from fixtures.deploy import DEPLOY_YAML, REPO

pytestmark = pytest.mark.deploy

DOCKERFILE = REPO / "deploy" / "Dockerfile"
VALUES = REPO / "deploy" / "values.yaml"

PG_ENV = {
    "DAGSTER_PG_HOST": "db.example.com",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "not-a-real-password",
    "DAGSTER_PG_DB": "dagster",
}


def test_the_production_instance_config_is_valid_and_reads_postgres_from_the_environment(
    tmp_path, monkeypatch
):
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    shutil.copy(DEPLOY_YAML, tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    postgres = config["storage"]["postgres"]["postgres_db"]
    assert {k: postgres[k] for k in ("hostname", "username", "db_name")} == {
        "hostname": {"env": "DAGSTER_PG_HOST"},
        "username": {"env": "DAGSTER_PG_USERNAME"},
        "db_name": {"env": "DAGSTER_PG_DB"},
    }
    assert postgres["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    assert "not-a-real-password" not in DEPLOY_YAML.read_text()
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    assert config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0


def _copied_by_dockerfile() -> list[str]:
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    return sources


def _setup_arguments(folder: Path, product_only: bool) -> dict:
    """What setup.py hands setuptools in `folder` (run as a program; nothing is built)."""
    probe = (
        "import json, runpy, setuptools\n"
        "seen = {}\n"
        "setuptools.setup = lambda **kw: seen.update(kw)\n"
        "runpy.run_path('setup.py')\n"
        "print(json.dumps(seen))\n"
    )
    env = {"CERTYO_PRODUCT_ONLY": "1"} if product_only else {}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_the_user_code_image_holds_the_product_only(tmp_path):
    copied = _copied_by_dockerfile()
    assert sorted(copied) == ["README.md", "certyo_dagster", "pyproject.toml", "setup.py"]
    for source in copied:
        path = REPO / source
        if path.is_dir():
            shutil.copytree(path, tmp_path / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, tmp_path / source)
    assert "CERTYO_PRODUCT_ONLY=1 pip install" in DOCKERFILE.read_text()
    image = _setup_arguments(tmp_path, product_only=True)
    assert {p.split(".")[0] for p in image["packages"]} == {"certyo_dagster"}
    # Only the product's own command (auditors verify bundles with it) and the dg registry.
    assert image["entry_points"] == {
        "console_scripts": ["certyo-proof = certyo_dagster.proof_cli:main"],
        "dagster_dg_cli.registry_modules": ["certyo_dagster = certyo_dagster"],
    }
    # The same sources without the switch (a developer's `pip install .`) keep the siblings'
    # scripts, so the switch is what removes them.
    full = _setup_arguments(REPO, product_only=False)
    assert {p.split(".")[0] for p in full["packages"]} == {
        "certyo_dagster",
        "certyo_sandbox",
        "certyo_demo",
    }
    assert len(full["entry_points"]["console_scripts"]) == 3  # certyo-proof, -sandbox, -demo


# Key names of the Dagster Helm chart (helm/dagster/schema/schema/charts/ in the Dagster
# repository: dagster/values.py and the subschema/ models for daemon, run_launcher,
# postgresql, global_ and concurrency, dagster_user_deployments/subschema/user_deployments.py).
CHART_KEYS = {
    "": {
        "global", "generatePostgresqlPasswordSecret", "postgresql", "dagster-user-deployments",
        "runLauncher", "dagsterDaemon", "dagsterWebserver", "concurrency", "telemetry",
        "retention", "computeLogManager", "pythonLogs", "serviceAccount", "imagePullSecrets",
        "ingress", "scheduler", "migrate", "busybox", "additionalInstanceConfig",
    },
    "global": {
        "postgresqlSecretName", "dagsterHome", "serviceAccountName", "celeryConfigSecretName",
        "dagsterInstanceConfigMap",
    },
    "postgresql": {
        "image", "enabled", "postgresqlHost", "postgresqlUsername", "postgresqlPassword",
        "postgresqlDatabase", "postgresqlParams", "postgresqlScheme", "service",
    },
    "dagster-user-deployments": {"enabled", "enableSubchart", "imagePullSecrets", "deployments"},
    "dagster-user-deployments.deployments[]": {
        "name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns",
        "deploymentNamespace", "port", "env", "envConfigMaps", "envSecrets", "annotations",
        "nodeSelector", "affinity", "tolerations", "podSecurityContext", "securityContext",
        "resources", "livenessProbe", "readinessProbe", "startupProbe", "labels",
        "volumeMounts", "volumes", "schedulerName", "initContainers", "sidecarContainers",
        "replicaCount", "service",
    },
    "runLauncher": {"type", "config"},
    "runLauncher.config": {"celeryK8sRunLauncher", "k8sRunLauncher", "customRunLauncher"},
    "runLauncher.config.k8sRunLauncher": {
        "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile",
        "envConfigMaps", "envSecrets", "envVars", "volumeMounts", "volumes", "labels",
        "failPodOnRunFailure", "resources", "schedulerName", "securityContext", "runK8sConfig",
    },
    "dagsterDaemon": {
        "enabled", "image", "runCoordinator", "heartbeatTolerance", "env", "envConfigMaps",
        "envSecrets", "deploymentLabels", "labels", "nodeSelector", "affinity", "tolerations",
        "podSecurityContext", "securityContext", "resources", "livenessProbe",
        "readinessProbe", "startupProbe", "annotations", "runMonitoring", "runRetries",
        "sensors", "schedules", "schedulerName", "volumeMounts", "volumes",
    },
    "dagsterDaemon.runCoordinator": {"enabled", "type", "config"},
    "dagsterDaemon.runCoordinator.config.queuedRunCoordinator": {
        "maxConcurrentRuns", "tagConcurrencyLimits", "dequeueIntervalSeconds",
        "dequeueNumWorkers", "dequeueUseThreads", "blockOpConcurrencyLimitedRuns",
    },
    # Rendered into run_monitoring / run_retries by the chart's configmap-instance.yaml.
    "dagsterDaemon.runMonitoring": {
        "enabled", "startTimeoutSeconds", "maxResumeRunAttempts", "pollIntervalSeconds",
    },
    "dagsterDaemon.runRetries": {"enabled", "maxRetries"},
    "concurrency": {"enabled", "pools", "runs"},
    "concurrency.pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "concurrency.runs": {"maxConcurrentRuns", "tagConcurrencyLimits"},
}  # fmt: skip


def _at(values: dict, path: str):
    node = values
    for part in filter(None, path.split(".")):
        node = node[part[:-2]][0] if part.endswith("[]") else node[part]
    return node


def test_the_helm_values_use_the_charts_key_names():
    values = yaml.safe_load(VALUES.read_text())
    for path, allowed in CHART_KEYS.items():
        node = _at(values, path) if path else values
        unknown = set(node) - allowed
        assert not unknown, f"{path or 'top level'}: not keys of the chart: {sorted(unknown)}"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["postgresql"]["postgresqlPassword"] == ""  # it comes from the secret
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "certyo_dagster.definitions"]
    secrets = {s["name"] for s in deployment["envSecrets"]}
    assert secrets == {
        s["name"] for s in values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]
    }
    assert not {"MONGO_URI", "CERTYO_API_KEY"} & {e["name"] for e in deployment["env"]}


def test_the_helm_values_set_the_limits_of_the_instance_the_suite_runs():
    values = yaml.safe_load(VALUES.read_text())
    instance = yaml.safe_load(DEPLOY_YAML.read_text())
    runs, chart_runs = instance["concurrency"]["runs"], values["concurrency"]["runs"]
    assert chart_runs["maxConcurrentRuns"] == runs["max_concurrent_runs"]
    assert chart_runs["tagConcurrencyLimits"] == runs["tag_concurrency_limits"]
    pools, chart_pools = instance["concurrency"]["pools"], values["concurrency"]["pools"]
    assert chart_pools == {
        "granularity": pools["granularity"],
        "defaultLimit": pools["default_limit"],
    }
    assert (
        values["dagsterDaemon"]["runRetries"]["maxRetries"]
        == instance["run_retries"]["max_retries"]
    )
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert not {"maxConcurrentRuns", "tagConcurrencyLimits"} & set(queued)
