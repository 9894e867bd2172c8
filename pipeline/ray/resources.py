"""Fail before any work if the actor pools that stream together cannot be placed on the cluster."""

from __future__ import annotations

import ray

from pipeline.capacity import largest_pool, needs
from pipeline.config import ConfigError


def check(source: str, stages: list, names: list[str], segments: list[list[int]]) -> None:
    """Raise ``ConfigError`` if the actor pools of one segment (they run at the same time) need more
    CPUs or GPUs than the cluster has (Ray would wait forever), or if a stage asks for GPUs the
    cluster does not have. ``names`` are the entries' YAML names, for the message."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    for need in needs(stages, names, segments):
        for i, (_n, _cpu, gpu) in need.pools.items():
            if gpu and gpus == 0:
                raise ConfigError(
                    f"{source}: stages[{i}] ({names[i]}): num_gpus={gpu:g} but the Ray cluster has no GPU; "
                    f"set num_gpus: 0 to run on CPU (--set stages.{names[i]}.num_gpus=0)"
                )
        if need.pools and (need.cpus > cpus + 1e-9 or need.gpus > gpus + 1e-9):
            i = largest_pool(need)  # the stage that asks for the most: the first one to lower
            raise ConfigError(
                f"{source}: stages[{i}] ({names[i]}): the actor pools that run together "
                f"({', '.join(need.parts)}) need {need.cpus:g} CPUs and {need.gpus:g} GPUs, the Ray "
                f"cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower 'concurrency' or 'num_cpus' of these stages"
            )
