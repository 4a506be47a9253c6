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
