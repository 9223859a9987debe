"""One local Ray cluster for the whole test session (starting Ray costs seconds)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, namespace="qualiteacher-tests",
                 log_to_driver=False)
    yield ray
    ray.shutdown()
