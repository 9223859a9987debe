"""Where the job's actors run: config `Resources` -> Ray options, and the driver's node.

Every role asks for what its `Resources` names (CPUs, GPUs, custom node resources), so a
config places teachers, scorers and the student on the nodes that carry their resources.
The labeller and Ray Train's controller stay on the driver's node: they hold the run's
state, and a node lost under them would be the job lost.
"""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from qualiteacher.config import Config, Resources


def actor_options(res: Resources, gpus_available: bool) -> dict:
    """`.options(...)` keywords for an actor of this role."""
    return {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus if gpus_available else 0,
            "resources": dict(res.resources)}


def train_worker_resources(res: Resources, use_gpu: bool) -> dict[str, float]:
    """Ray Train's `resources_per_worker`: CPUs, a GPU when used, and the custom resources."""
    out = {"CPU": res.num_cpus, **res.resources}
    if use_gpu:
        out["GPU"] = max(res.num_gpus, 1.0)
    return out


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Pin an actor to the node this process runs on (a hard constraint: never elsewhere)."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def role_resources(cfg: Config) -> dict[str, Resources]:
    return {"labelling.teacher_resources": cfg.labelling.teacher_resources,
            "labelling.scorer_resources": cfg.labelling.scorer_resources,
            "train.worker_resources": cfg.train.worker_resources}


def unplaceable_roles(cfg: Config, cluster_resources: dict[str, float]) -> dict[str, list[str]]:
    """Config field -> the custom resources it asks for that no node of the cluster has now.
    Not an error: such actors wait until a node with them joins (an autoscaler may add one)."""
    out = {}
    for field, res in role_resources(cfg).items():
        missing = sorted(name for name in res.resources if name not in cluster_resources)
        if missing:
            out[field] = missing
    return out
