"""docker-compose.yml parses, has the production services, and runs only real `clapq` commands."""

from __future__ import annotations

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
    assert (ROOT / "Dockerfile").is_file()
