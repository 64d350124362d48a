"""Property-based fuzzing of the HTTP API from its own /openapi.json (schemathesis).

Usage: python benchmarks/fuzz.py --url http://127.0.0.1:8000 [--examples 1000] [--key KEY]
   or: python benchmarks/fuzz.py --store demo/store [--examples 1000]   (starts `mage serve`)
Prints a table of status codes per operation, then one JSON line with the counts.

For every generated request (schema-valid bodies, and schema-violating ones) it checks:
no 5xx; every error is {"error": str, "error_type": str} (OpenAI's {"error": {"message",
"type", "param", "code"}} under /v1); strict JSON everywhere (no NaN or Infinity, SSE data
lines included); status codes, content types, headers and bodies as
/openapi.json documents them; a schema-violating body is refused with a 4xx; a
schema-valid one gets a 422 only for a reason that needs the store. tests/test_fuzz.py
runs the same checks with few examples in every `make test`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.served import serving  # noqa: E402

SCHEMA_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CONFIG = schemathesis.Config.from_dict(
    # How this server refuses a schema-violating request: 401 (a mangled key), 413 (a body
    # past max_body_bytes, before it is even read) or 422; anything else fails the run.
    {"checks": {"negative_data_rejection": {"expected-statuses": ["401", "413", "422"]}}}
)
SEMANTIC_422 = (
    "`preference`",  # length or names depend on the store's objectives; all zero
    "tokens",  # the prompt, counted in tokens, or with max_new_tokens past the context
    "not available in this store",  # a guidance mode the store lacks
    "Rewarded-Soup specialists",  # merge_method rewarded-soup on a store without them
    "Rewards-in-Context adapter",  # merge_method ric on a store without one
    "`messages` could not be rendered",  # the chat template's own rules (role order)
    "`messages` must have at most",  # total characters over all messages
    "`adapter_id`",  # objective names, modes and merge methods it names depend on the store
    "is not a usable",  # a grammar / response_format schema or regex the compiler refuses
    "`top_logprobs` needs `logprobs`",  # a rule across two fields (OpenAI's own)
)
"""What a schema-valid body may still get a 422 for: things the schema cannot know."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json(text: str | bytes) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity (Python's accepts them)."""
    return json.loads(text, parse_constant=_reject_constant)


def is_error_body(body: Any, openai: bool) -> bool:
    """{"error": str, "error_type": str}, or under /v1 OpenAI's {"error": {...}}."""
    if not isinstance(body, dict):
        return False
    if openai:
        error = body.get("error")
        return (
            set(body) == {"error"}
            and isinstance(error, dict)
            and set(error) == {"message", "type", "param", "code"}
            and all(isinstance(error[k], str) for k in ("message", "type", "code"))
            and isinstance(error["param"], str | None)
        )
    return set(body) == {"error", "error_type"} and all(isinstance(v, str) for v in body.values())


def error_message(content: bytes) -> str:
    error = strict_json(content)["error"]
    return error["message"] if isinstance(error, dict) else error


def body_problems(
    status: int, content_type: str, content: bytes, openai: bool = False
) -> list[str]:
    """The project's own rules, whatever the schema says; `openai`: a /v1 route."""
    problems = []
    if status >= 500:
        problems.append(f"server error {status}")
    try:
        if content_type.startswith("application/json"):
            body = strict_json(content)
            if status >= 400 and not is_error_body(body, openai):
                problems.append(f"error body not in the route's error shape: {body!r:.200}")
        elif content_type.startswith("text/event-stream"):
            lines = content.decode("utf-8").splitlines()
            for line in lines:
                if line.startswith("data: ") and not (openai and line == "data: [DONE]"):
                    data = strict_json(line[6:])
                    if openai and "error" in data and not is_error_body(data, openai):
                        problems.append(f"SSE error not in OpenAI's shape: {data!r:.200}")
            # No check for the final `data: [DONE]`: schemathesis reads 20 events at most.
            if "event: error" in lines:
                error = strict_json(lines[lines.index("event: error") + 1][6:])
                if set(error) != {"error", "error_type"}:
                    problems.append(f"SSE error event not in the error shape: {error!r:.200}")
            if status == 200 and not any(line.startswith("data: ") for line in lines):
                problems.append("empty event stream")
        elif status >= 400:
            problems.append(f"error answered as {content_type or 'no content type'}")
    except (ValueError, UnicodeDecodeError, IndexError) as exc:
        problems.append(f"not strict JSON: {exc}")
    return problems


@dataclass
class Report:
    """Counts over a fuzzing run."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    """(operation, status) -> responses."""
    failures: list[str] = field(default_factory=list)
    """One line per failing request: operation, mode, problem, and a curl to reproduce."""

    def summary(self) -> dict[str, Any]:
        by_status = Counter()
        for (_, status), count in self.statuses.items():
            by_status[str(status)] += count
        return {
            "requests": sum(self.statuses.values()),
            "status_codes": dict(sorted(by_status.items())),
            "failures": len(self.failures),
        }


def check_case(case: Any, response: Any, mode: GenerationMode) -> list[str]:
    content_type = (response.headers.get("content-type") or [""])[0]
    openai = case.operation.path.startswith("/v1/")
    problems = body_problems(response.status_code, content_type, response.content, openai)
    checks = [*SCHEMA_CHECKS, *([negative_data_rejection] if mode.is_negative else [])]
    try:
        case.validate_response(response, checks=checks)
    except (FailureGroup, Exception) as exc:  # FailureGroup is a BaseException
        problems.append(" ".join(str(exc).split())[:300])
    if mode.is_positive and response.status_code == 422:
        message = error_message(response.content)
        if not any(reason in message for reason in SEMANTIC_422):
            problems.append(f"schema-valid body refused: {message[:200]}")
    return problems


def fuzz(
    base_url: str,
    examples: int,
    api_key: str | None = None,
    derandomize: bool = False,
    timeout: float = 60.0,
) -> Report:
    """Generate `examples` requests per operation and mode against a live server."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    spec = httpx.get(f"{base_url}/openapi.json", headers=headers, timeout=timeout).json()
    schema = schemathesis.openapi.from_dict(spec, config=CONFIG)
    report = Report()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _run(operation, mode, base_url, headers, examples, derandomize, timeout, report)
    return report


def _run(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    headers: dict[str, str],
    examples: int,
    derandomize: bool,
    timeout: float,
    report: Report,
) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,  # failures are collected in the report, not printed
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=timeout)
        report.statuses[(operation.label, response.status_code)] += 1
        for problem in check_case(case, response, mode):
            curl = case.as_curl_command(headers=headers)
            report.failures.append(f"{operation.label} [{mode.value}] {problem}: {curl}")

    try:
        run()
    except Unsatisfiable:
        if mode.is_positive:
            raise  # every operation has at least one valid request
        # nothing to negate (an operation without parameters or body): no negative cases


def print_table(report: Report) -> None:
    statuses = sorted({status for _, status in report.statuses})
    operations = sorted({label for label, _ in report.statuses})
    print(f"{'operation':<28}" + "".join(f"{s:>7}" for s in statuses))
    for label in operations:
        counts = "".join(f"{report.statuses.get((label, s), 0):>7}" for s in statuses)
        print(f"{label:<28}{counts}")
    for failure in report.failures[:20]:
        print("FAIL", failure, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="a running server")
    source.add_argument("--store", help="serve this store with `mage serve` for the run")
    parser.add_argument("--examples", type=int, default=500, help="per operation and mode")
    parser.add_argument("--key", default=os.environ.get("MAGE_API_KEY", "").split(",")[0] or None)
    parser.add_argument("--max-new-tokens", type=int, default=4, help="with --store")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        flags = ["--max-new-tokens", str(args.max_new_tokens)]
        url = args.url or stack.enter_context(serving(args.store, flags)).url
        start = time.monotonic()
        report = fuzz(url, args.examples, api_key=args.key)
        seconds = time.monotonic() - start
    print_table(report)
    print(json.dumps({**report.summary(), "seconds": round(seconds, 1)}))
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
