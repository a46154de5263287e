"""The served OpenAPI schema holds: schemathesis fuzzes every operation it declares, and every route refuses
malformed input, unknown methods and unknown paths in OpenAI's error shape."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from server_utils import ERROR_FIELDS, start_server, stop_server, tiny_args

# Test cases per operation in schemathesis' fuzzing phase; its coverage phase adds about a thousand fixed ones.
EXAMPLES = int(os.environ.get("KVSERVE_SCHEMATHESIS_EXAMPLES", "50"))
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance")
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]
# Bodies each route accepts, so that an unknown field added to them is the only thing wrong.
VALID = {"/v1/completions": {"prompt": "The quick", "max_tokens": 1},
         "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 1},
         "/tokenize": {"prompt": "The quick"}, "/detokenize": {"tokens": [5, 6]}}
MALFORMED = {"not JSON": b"{not json", "not UTF-8": b'{"prompt": "\xff\xfe"}', "an array": b"[]",
             "deeply nested": b"[" * 100_000}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_model):
    server = start_server(tiny_args(tiny_model))
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def schema(server) -> dict:
    response = httpx.get(f"{server.url}/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def error_shape_problem(response: httpx.Response, status: int | None = None) -> str | None:
    """Why ``response`` is not an OpenAI error (of ``status``, or else any 4xx), or None when it is one."""
    code = response.status_code
    if not (code == status if status else 400 <= code < 500):
        return f"answered {code}, expected {status or '4xx'}: {response.text[:300]}"
    try:
        body = response.json()
    except ValueError:
        return f"answered {code} with a body that is not JSON: {response.text[:300]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(body) != {"error"} or set(error) != ERROR_FIELDS:
        return f"answered {code} with {body!r}, not {{'error': {sorted(ERROR_FIELDS)}}}"
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
            and error["code"] == code and (error["param"] is None or isinstance(error["param"], str))):
        return f"answered {code} with a malformed error {error!r}"
    return None


def test_schema_documents_bounds_replies_and_errors(schema):
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    temperature = next(t for t in fields["temperature"]["anyOf"] if t["type"] == "number")
    assert temperature["minimum"] == 0
    top_p = next(t for t in fields["top_p"]["anyOf"] if t["type"] == "number")
    assert (top_p["exclusiveMinimum"], top_p["maximum"]) == (0, 1)
    completions = schema["paths"]["/v1/completions"]["post"]
    assert set(completions["responses"]) == {"200", "400", "401", "404", "413", "500", "503"}
    assert completions["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Completion"}
    assert "422" not in str(schema["paths"])
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]


def test_schemathesis_finds_no_server_error(server, tmp_path):
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
               "--checks", ",".join(CHECKS), "--max-examples", str(EXAMPLES), "--seed", "20240601",
               "--generation-database", "none", "--workers", "1", "--request-timeout", "60",
               "--continue-on-failure", "--output-sanitize", "false", "--no-color"]
    # Run in tmp_path: schemathesis keeps its crash cache (.schemathesis/) and hypothesis its own data in the cwd.
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / ".hypothesis")})
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    print(result.stdout[result.stdout.find("Warnings:"):])   # the counts, with -s


def test_every_route_refuses_malformed_input(server, schema):
    problems = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path, operations in schema["paths"].items():
            if "post" in operations:
                bodies = {**MALFORMED, "an unknown field": {**VALID.get(path, {}), "no_such_field": 1}}
                for what, body in bodies.items():
                    response = (client.post(path, json=body) if isinstance(body, dict)
                                else client.post(path, content=body, headers=JSON))
                    problem = error_shape_problem(response)
                    if problem is None and path in VALID and what == "an unknown field" \
                            and response.json()["error"]["param"] != "no_such_field":
                        problem = f"does not name the unknown field: {response.text[:300]}"
                    if problem:
                        problems.append(f"POST {path} with {what} {problem}")
            method = next(m for m in ("delete", "put", "patch", "post", "get") if m not in operations)
            if problem := error_shape_problem(client.request(method.upper(), path), 405):
                problems.append(f"{method.upper()} {path} {problem}")
        if problem := error_shape_problem(client.get("/v1/no-such-route"), 404):
            problems.append(f"GET /v1/no-such-route {problem}")
    assert not problems, "\n".join(problems)
