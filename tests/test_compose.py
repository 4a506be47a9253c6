"""docker-compose.yml parses, has the production services, and runs only real `clapq` commands."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from clapq.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _subcommands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)


def test_compose_services_and_commands():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "beat"} <= set(services)
    assert services["postgres"]["image"].startswith("pgvector/pgvector")
    assert services["redis"]["image"].startswith("redis")
    known = _subcommands()
    for name in ("migrate", "api", "worker", "beat"):
        cmd = services[name]["command"]
        assert cmd[0] == "clapq" and cmd[1] in known, (name, cmd)
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql://") and env["REDIS_URL"].startswith("redis://")
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # every volume a clapq service mounts is a directory the image makes and gives to its user (a named
    # volume takes the owner of what the image has there; one Docker makes is root's, and the model
    # download into HF_HOME failed)
    dockerfile = (ROOT / "Dockerfile").read_text()
    owned = re.search(r"mkdir -p ([^&\n]+) && chown clapq ([^\n]+)", dockerfile)
    assert owned, dockerfile
    for name in ("api", "worker", "beat"):
        for volume in services[name].get("volumes", []):
            target = volume.split(":")[1]
            assert target in owned.group(1).split() and target in owned.group(2).split(), (name, volume)


def _variables_read() -> set[str]:
    """Every CLAPQ_* environment variable the code reads (CLAPQ_PROCESS is set by the CLI itself)."""
    names = set()
    for pkg in ("clapq", "api", "worker"):
        for path in (ROOT / pkg).glob("*.py"):
            names |= set(re.findall(r'"(CLAPQ_[A-Z0-9_]+)"', path.read_text()))
    return names - {"CLAPQ_PROCESS"}


def test_every_setting_is_documented_and_compose_sets_only_real_ones():
    names = _variables_read()
    assert {"CLAPQ_MODEL", "CLAPQ_TEXT_INT8", "CLAPQ_WORKER_NICE"} <= names
    readme = (ROOT / "README.md").read_text()
    undocumented = sorted(n for n in names if f"`{n}`" not in readme)
    assert not undocumented, f"README's configuration table lacks {undocumented}"
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in spec["services"].items():
        unknown = sorted(k for k in service.get("environment", {}) if k.startswith("CLAPQ_") and k not in names)
        assert not unknown, f"docker-compose service {name} sets {unknown}, which clapq never reads"
