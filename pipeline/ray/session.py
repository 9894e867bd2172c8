"""Start or join Ray, and set up the Ray Data context for a run."""

from __future__ import annotations

import os
import warnings

import ray
from ray.data import DataContext

# Driver environment forwarded to every Ray worker (runtime_env). AWS_*/FSSPEC_* carry object-store
# credentials and endpoints (AWS_ENDPOINT_URL, FSSPEC_S3_*), so nodes of a `ray start` cluster, whose
# environment is not the driver's, reach the same storage. They are visible in the job's runtime env;
# on a real cluster prefer instance roles / node-level credentials and leave them unset on the driver.
# Retry options (max_retries, max_restarts, max_task_retries) have no named parameter in Ray 2.60's
# map_batches and still go through ray_remote_args; we set them explicitly on purpose.
warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")

ENV_PREFIXES = ("CLIPCURATE_", "NO_ALBUMENTATIONS", "HF_", "AWS_", "FSSPEC_", "GOOGLE_APPLICATION_")

# CPUs reserved by the glue tasks (input/spill loaders, shard/spill sinks). They are I/O-bound and
# short; reserving a whole CPU each deadlocks a cluster whose CPUs are all held by actor pools (the
# demo on 2 CPUs: download + clip_score actors hold both, so read and write could never start).
# Reserving no CPU, they are capped by count instead (``glue_concurrency``): uncapped, Ray Data
# starts one worker process (~200 MB) per pending shard and memory grows with the input
# (bench/scale.py: 2.2x the peak at 10x input uncapped, flat capped).
GLUE_TASK_CPUS = 0


def glue_concurrency() -> int:
    """Glue tasks in flight per operator: enough writers for a large cluster, few on a small one."""
    return max(2, int(ray.cluster_resources().get("CPU", 0)) // 4)


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def init_ray(pipe) -> None:
    if ray.is_initialized():
        return
    rc = pipe.config.ray
    address = rc.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": forwarded_env()}
    if address:
        # Inside a Ray Job the job's runtime env already reaches every worker; passing one here too
        # makes Ray refuse to merge any key both set.
        in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
        ray.init(address=address, runtime_env=None if in_job else env, log_to_driver=True)
    else:
        ray.init(
            address="local",  # never attach to some other cluster on this machine by accident
            num_cpus=rc.num_cpus,
            object_store_memory=rc.object_store_memory,
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=True,
        )


def configure_data_context(pipe) -> None:
    ctx = DataContext.get_current()
    ctx.target_max_block_size = pipe.config.ray.target_max_block_size
    ctx.enable_progress_bars = pipe.config.ray.show_progress
    ctx.enable_operator_progress_bars = pipe.config.ray.show_progress
    ctx.verbose_progress = False
    ctx.execution_options.preserve_order = False


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def ensure_local_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray once (tests share one session through this)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
