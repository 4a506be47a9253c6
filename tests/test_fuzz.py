"""The HTTP API fuzzed from its own OpenAPI description (schemathesis): no input gets a 5xx."""

from __future__ import annotations

import dataclasses

import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as fuzz_settings

from api import create_app
from tests.audio import write
from tests.conftest import auth, wait_job
from tests.test_e2e import upload


def test_no_request_gets_a_server_error(settings, new_key, worker, tmp_path):
    """Every operation /openapi.json describes, 25 generated requests each (the same ones every run),
    as a tenant with its own key, each sent twice: with the generated ids, and with the ids of that
    tenant's real library, embedded file and job (DELETEs only the first way), so the bodies and queries reach the code behind the
    lookups. Every answer is below 500. Failures are collected across operations."""
    # ~1,150 requests of one key in ~15 s: near the default CLAPQ_RATE_LIMIT (1,200 a minute), past which the
    # last operations would be fuzzed with 429s that reach no handler
    app = create_app(dataclasses.replace(settings, rate_limit="100000/minute"))
    client, key = app.test_client(), new_key()
    lib = client.post("/v1/libraries", json={"name": "fuzzed"}, headers=auth(key)).get_json()
    up = upload(client, key, lib["id"], [write(tmp_path / "f.wav", 1.0, seed=1)]).get_json()
    assert wait_job(client, key, up["job_id"])["status"] == "done"
    real = {"library_id": lib["id"], "item_id": up["items"][0]["id"], "job_id": up["job_id"]}
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    failures, operations = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @fuzz_settings(max_examples=25, deadline=None, derandomize=True, database=None,
                       suppress_health_check=list(HealthCheck))
        def answers_below_500(case):
            # a DELETE with the real ids would leave the operations after it nothing real to reach
            for ids in (False,) if operation.method.upper() == "DELETE" else (False, True):
                if ids:  # the tenant's own ids wherever the request names one
                    for part in (case.path_parameters, case.query, case.body):
                        if isinstance(part, dict):
                            part.update({k: v for k, v in real.items() if k in part})
                response = case.call(headers=auth(key))
                assert response.status_code < 500, (response.status_code, response.text[:300],
                                                     case.as_curl_command())

        try:
            answers_below_500()
        except AssertionError as exc:
            failures.append(f"{operation.label}: {exc}")
    assert operations >= 20
    assert failures == []
