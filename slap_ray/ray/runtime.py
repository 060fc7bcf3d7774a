"""Connecting to Ray: a running cluster (job or address) or an embedded local instance."""

from __future__ import annotations

import os

import ray

from slap_ray.config import RayConfig

# Keep Ray's own traffic on the loopback address unless a cluster address is given.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def ensure_ray(config: RayConfig) -> bool:
    """Initialise Ray if needed; returns True when this call started it (so it should stop it).

    Inside ``ray job submit`` RAY_ADDRESS is set and ``ray.init()`` joins that cluster.
    """
    if ray.is_initialized():
        return False
    kwargs: dict = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    if config.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=config.address or os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # "local" always starts a fresh instance, never a leftover cluster found on the machine.
        ray.init(
            address="local",
            num_cpus=config.num_cpus,
            object_store_memory=config.object_store_memory,
            include_dashboard=False,
            **kwargs,
        )
    return True
