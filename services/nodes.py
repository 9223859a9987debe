"""The cluster's nodes over one run: which were lost and which joined, for summary.json.

The GCS keeps dead nodes in its table, so comparing the table at the start of a run with
the table at its end tells every node lost in between (also one that joined and was lost
again), without watching the cluster while the run goes on.
"""

from __future__ import annotations

import ray

# Resources every node has, or that only say which node it is: left out of the summary.
_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


def _custom(resources: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in resources.items() if k not in _BUILTIN and not k.startswith("node:")}


def node_table() -> dict[str, dict]:
    """node id -> {"alive", "name", "resources" (custom ones)}, dead nodes included."""
    return {n["NodeID"]: {"alive": bool(n["Alive"]), "name": n.get("NodeName", ""),
                          "resources": _custom(n.get("Resources") or {})}
            for n in ray.nodes()}


def node_changes(before: dict[str, dict], after: dict[str, dict]) -> dict[str, list[dict]]:
    """Nodes lost (alive at the start or joined since, dead at the end) and nodes joined."""

    def entry(node_id: str) -> dict:
        # A dead node reports no resources: take them from when it was seen alive.
        seen = before.get(node_id, after[node_id])
        return {"node_id": node_id, "name": seen["name"], "resources": seen["resources"] or after[node_id]["resources"]}

    lost = [i for i, n in after.items() if not n["alive"] and before.get(i, {"alive": True})["alive"]]
    joined = [i for i in after if i not in before]
    return {"nodes_lost": [entry(i) for i in lost], "nodes_joined": [entry(i) for i in joined]}
