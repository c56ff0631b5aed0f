"""Long schemathesis run (issue 6): >= 1,000 generated cases against /openapi.json.

    .venv/bin/python benchmarks/fuzz.py --max-examples 150

Starts the scripted-engine server process of benchmarks/soak.py, then runs the schemathesis CLI
against it, every operation, positive and negative generation, with the checks that apply to
this API: no 5xx (not_a_server_error) and every response as declared in /openapi.json (status
code, content type, headers, body schema — the error bodies of each protocol are declared).
Excluded, with reason: positive_data_acceptance (schema-valid bodies can still name an unknown
model, i.e. a correct 404) and the stateful/auth checks (no resources, no auth configured).
Prints the CLI's summary (cases tried, failures) and exits with its code.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import start_server  # noqa: E402

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-examples", type=int, default=150, help="per operation")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--report-dir", default="/tmp/tokenfactory-fuzz-report")
    args = p.parse_args()
    proc, base = start_server()
    try:
        cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", base + "/openapi.json",
               "--checks", CHECKS, "--max-examples", str(args.max_examples),
               "--seed", str(args.seed), "--workers", str(args.workers),
               "--phases", "examples,coverage,fuzzing", "--mode", "all",
               "--request-timeout", "120", "--suppress-health-check", "all",
               "--report", "junit", "--report-dir", args.report_dir]
        print("$", " ".join(cmd), flush=True)
        code = subprocess.call(cmd)
    finally:
        proc.terminate()
        proc.wait(60)
    return code


if __name__ == "__main__":
    sys.exit(main())
