"""Everything that runs on Ray: the only package of clipcurate that imports ray.

* ``session``: starting or joining a Ray cluster, the Ray Data context.
* ``workers``: what Ray runs for a source, a stage or a sink (operators named after their stage).
* ``fitting``: global stages (spill the rows entering them, fit, persist the state).
* ``shuffle``: shuffle stages (partition, decide, per-shard decision files the apply pass loads).
* ``sinks``: Ray Datasinks (final shards, spills).
* ``hooks``: dataset-level operations that stages describe (``ray.data.llm`` processors).
* ``resources``: the pre-flight check that the actor pools fit on the cluster.
* ``executor``: one run, from the validated pipeline to ``manifest.json``.
* ``jobs``: ``clipcurate submit`` (Ray Jobs).
"""

from pipeline.ray.executor import Executor, run
from pipeline.ray.jobs import submit
from pipeline.ray.session import ensure_local_ray, init_ray, shutdown

__all__ = ["Executor", "ensure_local_ray", "init_ray", "run", "shutdown", "submit"]
