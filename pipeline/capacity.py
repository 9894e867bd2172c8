"""What the stages of a run reserve on the cluster, computed from their declarations alone (Ray-free).

A run streams through *segments*: the stages between two global stages run at the same time (a
global stage starts a new segment, after its fit pass). In a segment each actor pool reserves
``concurrency x (num_cpus, num_gpus)`` for the whole pass, and the task stages need a CPU free
beside them (the largest of their ``num_cpus``). ``clipcurate plan`` prints these totals and warns
when a local Ray cannot hold them; ``pipeline.ray.resources`` refuses a run whose pools cannot be
placed on the cluster it joined.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


@dataclass
class SegmentNeed:
    """What one segment (stage indices ``stages``) reserves while it streams."""

    stages: list[int]
    cpus: float = 0.0  # actors' CPUs plus the largest task stage's
    gpus: float = 0.0
    actors: int = 0
    task_cpus: float = 0.0  # the CPU(s) kept free for task stages (included in ``cpus``)
    parts: list[str] = field(default_factory=list)  # "download 1x1 CPU", for messages
    pools: dict[int, tuple[int, float, float]] = field(
        default_factory=dict
    )  # stage -> (actors, cpus, gpus) each


def segments(stages: list) -> tuple[list[int], list[list[int]]]:
    """``(global stage indices, segments)`` of built entries ``stages`` (source first, sink last):
    the middle stages cut before each global stage."""
    middle = list(range(1, len(stages) - 1))
    globals_ = [i for i in middle if stages[i].is_global]
    segs, cur = [], []
    for i in middle:
        if i in globals_:
            segs.append(cur)
            cur = [i]
        else:
            cur.append(i)
    segs.append(cur)
    return globals_, segs


def needs(stages: list, names: list[str], segs: list[list[int]]) -> list[SegmentNeed]:
    """What each segment of ``segs`` reserves (``names``: the entries' names, for ``parts``)."""
    out = []
    for seg in segs:
        need = SegmentNeed(stages=list(seg))
        res = {i: stages[i].resources() for i in seg}
        tasks = [res[i].num_cpus for i in seg if not res[i].actor]
        if tasks:
            need.task_cpus = max(tasks)
            need.cpus += need.task_cpus
            need.parts.append(f"task stages {need.task_cpus:g} CPU")
        for i in seg:
            r = res[i]
            if not r.actor:
                continue
            n = r.concurrency or 1
            need.pools[i] = (n, r.num_cpus, r.num_gpus)
            need.actors += n
            need.cpus += n * r.num_cpus
            need.gpus += n * r.num_gpus
            need.parts.append(
                f"{names[i]} {n}x{r.num_cpus:g} CPU" + (f"+{r.num_gpus:g} GPU" if r.num_gpus else "")
            )
        out.append(need)
    return out


def largest_pool(need: SegmentNeed) -> int | None:
    """The stage of ``need`` whose pool asks for the most (the first one to lower)."""
    if not need.pools:
        return None
    return max(need.pools, key=lambda i: need.pools[i][0] * max(need.pools[i][1], need.pools[i][2]))


def local_gpus() -> int:
    """GPUs a local Ray would see: ``CUDA_VISIBLE_DEVICES`` when set, else ``nvidia-smi -L``'s count."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        r = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in r.stdout.splitlines() if line.startswith("GPU ")) if r.returncode == 0 else 0


def local_capacity(num_cpus: int | None) -> tuple[float, float]:
    """``(CPUs, GPUs)`` of a local Ray started with ``ray.num_cpus`` (null: every CPU of the machine)."""
    return float(num_cpus or os.cpu_count() or 1), float(local_gpus())
