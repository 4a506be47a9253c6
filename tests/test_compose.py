"""docker-compose.yml parses, has the production services, and runs only real `clapq` commands."""

from __future__ import annotations

import os
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
    # the api's stop grace outlasts gunicorn's own for requests in flight (Docker's default 10 s cut them off)
    graceful = int(re.search(r'"--graceful-timeout", "(\d+)"', (ROOT / "clapq" / "cli.py").read_text())[1])
    assert int(services["api"]["stop_grace_period"].rstrip("s")) > graceful, services["api"]
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
    """Every CLAPQ_* environment variable the code reads (CLAPQ_PROCESS, CLAPQ_START_DIR and CLAPQ_UP are set by
    the CLI itself, for the processes it starts)."""
    names = set()
    for pkg in ("clapq", "api", "worker"):
        for path in (ROOT / pkg).glob("*.py"):
            names |= set(re.findall(r'"(CLAPQ_[A-Z0-9_]+)"', path.read_text()))
    return names - {"CLAPQ_PROCESS", "CLAPQ_START_DIR", "CLAPQ_UP"}


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


_UNITS = {"GiB": 1024**3, "MiB": 1024**2, "h": 3600, "min": 60, "s": 1}


def _table_default(raw: str, defaults: dict[str, str]):
    """A default as the configuration table writes it ("16", "2 GiB", "4 h", "`auto`", "0 (auto)", "a quarter
    of `CLAPQ_MAX_PENDING` (50000)", "`CLAPQ_BATCH_SIZE`") as a value to compare, or None where it is prose."""
    raw = raw.strip()
    if m := re.fullmatch(r"`(CLAPQ_[A-Z0-9_]+)`", raw):  # the default of another variable
        return _table_default(defaults[m.group(1)], defaults)
    if m := re.match(r"`?([\d,]+)\s*([A-Za-z]+)?`?(?:\s|$)", raw):  # a number, with a unit
        unit = _UNITS.get(m.group(2) or "", 1 if m.group(2) is None else None)
        return None if unit is None else int(m.group(1).replace(",", "")) * unit
    if m := re.search(r"\((\d+)\)$", raw):  # prose, then the number it makes
        return int(m.group(1))
    if m := re.fullmatch(r"`([^`]+)`", raw):
        return m.group(1)
    return None


def test_configuration_table_defaults_are_the_code_s():
    """Each default the README's configuration table gives for a setting is the one clapq.settings applies with
    nothing set (a table said one thing while the code did another for nobody to notice)."""
    import dataclasses

    from clapq.settings import Settings

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration (environment)", 1)[1].split("\n## ", 1)[0]
    actual = Settings.from_env({})
    fields = {f.name for f in dataclasses.fields(Settings)}
    attr = {"CLAPQ_COMPILE": "compile_model"}
    rows: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`(CLAPQ_[A-Z0-9_]+)`", cells[0]) if len(cells) >= 3 else []
        if not names:
            continue
        values = [cells[1]] if len(names) == 1 else [v.strip() for v in cells[1].split(", ")]
        named = [n for n in names if attr.get(n, n[len("CLAPQ_"):].lower()) in fields]
        assert len(values) == len(names) or not named, f"the table's row for {names} gives {cells[1]!r}"
        rows.update(zip(names, values))
    checked = []
    for name, raw in rows.items():
        field = attr.get(name, name[len("CLAPQ_"):].lower())
        if field not in fields or isinstance(getattr(actual, field), os.PathLike):
            continue
        want = _table_default(raw, rows)
        if want is None:
            continue
        have = getattr(actual, field)
        if isinstance(have, bool):
            have = int(have)
        if have is None:
            have = "auto"
        assert str(want).lower() == str(have).lower(), f"README: {name} defaults to {raw!r}; clapq.settings: {have!r}"
        checked.append(name)
    assert {"CLAPQ_BATCH_SIZE", "CLAPQ_MAX_REQUEST_BYTES", "CLAPQ_MAX_DURATION_S", "CLAPQ_MAX_PENDING_PER_TENANT",
            "CLAPQ_RATE_LIMIT", "CLAPQ_COMPILE", "CLAPQ_STALE_AFTER_S", "CLAPQ_LOG_LEVEL"} <= set(checked), checked
