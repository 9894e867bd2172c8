"""Fail before any work if the actor pools that stream together cannot be placed on the cluster."""

from __future__ import annotations

import ray

from pipeline.config import ConfigError


def check(source: str, stages: list, names: list[str], segments: list[list[int]]) -> None:
    """Raise ``ConfigError`` if the actor pools of one segment (they run at the same time) need more
    CPUs or GPUs than the cluster has (Ray would wait forever), or if a stage asks for GPUs the
    cluster does not have. ``names`` are the entries' YAML names, for the message."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    for seg in segments:
        need_cpu, need_gpu, parts = 0.0, 0.0, []
        res = {i: stages[i].resources() for i in seg}
        # task stages need a CPU free beside the actors (the largest of them), or they starve
        tasks = [res[i].num_cpus for i in seg if not res[i].actor]
        if tasks:
            need_cpu += max(tasks)
            parts.append(f"task stages {max(tasks):g} CPU")
        actors = [i for i in seg if res[i].actor]
        for i in actors:
            r = res[i]
            n = r.concurrency or 1
            if r.num_gpus and gpus == 0:
                raise ConfigError(
                    f"{source}: stages[{i}] ({names[i]}): num_gpus={r.num_gpus:g} but the Ray cluster has no GPU; "
                    f"set num_gpus: 0 to run on CPU (--set stages.{names[i]}.num_gpus=0)"
                )
            need_cpu += n * r.num_cpus
            need_gpu += n * r.num_gpus
            parts.append(f"{names[i]} {n}x{r.num_cpus:g} CPU")
        if actors and (need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9):
            # name the stage that asks for the most: the first one to lower
            i = max(actors, key=lambda j: (res[j].concurrency or 1) * max(res[j].num_cpus, res[j].num_gpus))
            raise ConfigError(
                f"{source}: stages[{i}] ({names[i]}): the actor pools that run together "
                f"({', '.join(parts)}) need {need_cpu:g} CPUs and {need_gpu:g} GPUs, the Ray "
                f"cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower 'concurrency' or 'num_cpus' of these stages"
            )
