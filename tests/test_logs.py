"""Both log formats carry the ids passed with `extra=`: JSON fields, or key=value in a terminal."""

from __future__ import annotations

import json
import logging

import pytest

from clapq import logs


@pytest.fixture()
def restore_root():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_text_and_json_logs_carry_the_extras(capsys, restore_root):
    log = logging.getLogger("clapq.test")
    logs.configure("INFO", "text")
    log.info("model loaded", extra={"device": "cpu", "precision": "bf16"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("item failed", extra={"item_id": "i-1", "error": 'not audio\n(bad "header")'})
    text = capsys.readouterr().err.splitlines()
    assert text[0].endswith("INFO clapq.test: model loaded device=cpu precision=bf16")
    # a free-form sentence stays on its line, quoted
    assert text[1].endswith('ERROR clapq.test: item failed item_id=i-1 error="not audio\\n(bad \\"header\\")"')
    assert "ValueError: boom" in text[-1]  # the traceback follows

    logs.configure("INFO", "json")
    log.info("model loaded", extra={"device": "cpu", "precision": "bf16"})
    record = json.loads(capsys.readouterr().err)
    assert (record["msg"], record["device"], record["precision"], record["level"]) == (
        "model loaded", "cpu", "bf16", "info")


def test_a_workers_output_is_json_lines_but_celerys_word_at_a_signal(env, tmp_path):
    """`clapq worker` printed Celery's banner (15 lines of ASCII art and settings) on stdout and, run as root as in a
    container, Celery's SecurityWarning as 8 loose lines, among its JSON records: a log shipper parsing JSON drops
    them or stores them unparsed. The banner is left out in JSON (what it said is in the records: the broker, ready)
    and a warning is a record, as is billiard's line for a pool process that died (killed here, as by the OOM
    killer), which was loose too. Celery's own print as it is told to stop ("worker: Warm shutdown") stays."""
    import os
    import signal
    import time

    import psutil

    from tests.conftest import WorkerProcess

    w = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        child = psutil.Process(w.proc.pid).children()[0]
        child.kill()  # the OOM killer
        deadline = time.monotonic() + 30
        while f"pid:{child.pid} exited with" not in w.output():
            assert time.monotonic() < deadline, w.output()[-3000:]
            time.sleep(0.2)
    finally:
        w.stop(signal.SIGTERM)
    lines = [line for line in w.output().splitlines() if line.strip()]
    loose = [line for line in lines if not line.startswith("{")]
    assert loose == ["worker: Warm shutdown (MainProcess)"], w.output()[-3000:]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(r["logger"] == "celery.apps.worker" and r["msg"].endswith(" ready.") for r in records), records
    died = [r["msg"] for r in records if r["logger"] == "multiprocessing"]
    assert f"pid:{child.pid} exited with 'signal 9 (SIGKILL)'" in died[0], died
    if os.geteuid() == 0:  # Celery warns a worker run as root
        assert any(r["logger"] == "py.warnings" and "SecurityWarning" in r["msg"] for r in records), records
