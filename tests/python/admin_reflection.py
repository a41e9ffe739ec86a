"""Drives a tidemark node's Admin service with a generic gRPC client that knows
no .proto file: everything is discovered through server reflection.

usage: admin_reflection.py HOST:PORT
Finds the open conflict, resolves it keeping the shown version, and prints a JSON
summary. Exits non-zero with a message when anything is not as expected.
"""

import json
import sys

from grpc_requests import Client


def main() -> None:
    endpoint = sys.argv[1]
    client = Client.get_by_endpoint(endpoint)
    services = client.service_names
    for name in ("tidemark.v1.Admin", "tidemark.v1.Records", "tidemark.v1.Replication", "grpc.health.v1.Health"):
        if name not in services:
            sys.exit(f"{name} not offered through reflection: {services}")

    health = client.request("grpc.health.v1.Health", "Check", {"service": "tidemark.v1.Admin"})
    if health.get("status") != "SERVING":
        sys.exit(f"Admin is not SERVING: {health}")

    status = client.request("tidemark.v1.Admin", "Status", {})
    open_conflicts = client.request("tidemark.v1.Admin", "ListConflicts", {"status": "open"})
    conflicts = open_conflicts.get("conflicts", [])
    if len(conflicts) != 1:
        sys.exit(f"expected one open conflict, got {conflicts}")
    conflict = conflicts[0]
    resolved = client.request(
        "tidemark.v1.Admin",
        "ResolveConflict",
        {
            "conflict_id": conflict["conflict_id"],
            "choice": "RESOLVE_CHOICE_KEEP_LOCAL",
            "resolved_by": "python-grpc-requests",
            "note": "resolved through reflection",
        },
    )
    print(json.dumps({
        "node_id": status["node_id"],
        "tables": [t["name"] for t in status.get("tables", [])],
        "conflict_id": conflict["conflict_id"],
        "event_id": resolved["event_id"],
    }))


if __name__ == "__main__":
    main()
