"""Start or join Ray, and set up the Ray Data context for a run."""

from __future__ import annotations

import logging
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


AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def glue_concurrency() -> int:
    """Glue tasks in flight per operator: enough writers for a large cluster, few on a small one."""
    return max(2, int(ray.cluster_resources().get("CPU", 0)) // 4)


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def init_ray(pipe, quiet: bool = False) -> None:
    """Join the cluster at ``ray.address`` / ``$RAY_ADDRESS``, else start a local Ray. ``quiet`` (the
    CLI's progress mode when stdout is not a terminal): Ray's INFO lines and the workers' Hugging Face
    progress bars are left out of the output (Ray's session logs still have everything)."""
    if ray.is_initialized():
        return
    rc = pipe.config.ray
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights: 100%|..." per actor
    env = {"env_vars": forwarded_env()}
    level = logging.WARNING if quiet else logging.INFO
    if address:
        # Inside a Ray Job the job's runtime env already reaches every worker; passing one here too
        # makes Ray refuse to merge any key both set.
        in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
        ray.init(
            address=address, runtime_env=None if in_job else env, log_to_driver=True, logging_level=level
        )
    else:
        if quiet:  # Ray >= 2.60 says in a WARNING line on every new local Ray that token auth is on
            logging.getLogger(AUTH_SETUP_LOGGER).setLevel(logging.ERROR)
        ray.init(
            address="local",  # never attach to some other cluster on this machine by accident
            num_cpus=rc.num_cpus,
            object_store_memory=rc.object_store_memory,
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=True,
            logging_level=level,
        )


def _pass_actor_arguments_by_value() -> None:
    """Make restarts of Ray Data actors independent of the object store, without Ray's warning.

    Ray Data (2.60) creates each actor of a pool with its UDF and its DataContext as ObjectRefs (put
    once per operator) and ``max_restarts`` on; Ray core then logs an error-level line at the first
    actor ("has constructor arguments in the object store and max_restarts > 0 ... the actor restart
    will fail", ray-project/ray#53727). Our UDFs carry only small arguments (a stage name, its config
    as JSON, the URL of its fitted state), so the actors get both objects by value: Ray stores them
    with the actor's creation spec and a restarted actor never depends on an object the driver could
    lose. Ray Data's workers resolve either form the same way."""
    try:
        from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator
    except ImportError:  # a Ray Data without that operator: nothing to adjust
        return
    if getattr(ActorPoolMapOperator, "_clipcurate_by_value", False):
        return
    ActorPoolMapOperator._map_transformer_ref = property(lambda self: self._map_transformer)
    ActorPoolMapOperator._data_context_ref = property(lambda self: self.data_context)
    ActorPoolMapOperator._clipcurate_by_value = True


# Ray Data console lines left out in quiet mode (its log file in the session dir keeps them): the note
# that progress bars are off (we turned them off), and the "no available CPUs" warning Ray Data logs
# when a dataset starts right after ``ray.init`` (the cluster has not reported its CPUs yet; the
# pre-flight check ``pipeline.ray.resources`` has already made sure the actor pools fit).
QUIET_DATA_MESSAGES = (
    "Progress bars disabled",
    "Progress bars for operators disabled",
    "does not have any available CPUs",
)


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(m in msg for m in QUIET_DATA_MESSAGES)


def quiet_ray_data_console() -> None:
    """Ray Data's console handler: WARNING and above, without ``QUIET_DATA_MESSAGES`` (its file
    handler, ``ray-data.log`` in the session's logs, keeps every line)."""
    from ray.data._internal.logging import SessionFileHandler

    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, SessionFileHandler):
            continue
        h.setLevel(logging.WARNING)
        if not any(isinstance(f, _DropMessages) for f in h.filters):
            h.addFilter(_DropMessages())


def configure_data_context(pipe, quiet: bool = False) -> None:
    """Ray Data's context for a run. ``quiet``: no Ray Data progress (bars on a terminal, a 15-line
    block every 10 s otherwise) and no INFO lines; else its progress as ``ray.show_progress`` says."""
    _pass_actor_arguments_by_value()
    ctx = DataContext.get_current()
    ctx.target_max_block_size = pipe.config.ray.target_max_block_size
    show = pipe.config.ray.show_progress and not quiet
    if quiet:
        quiet_ray_data_console()
    ctx.enable_progress_bars = show
    ctx.enable_operator_progress_bars = show
    ctx.verbose_progress = False
    ctx.execution_options.preserve_order = False


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def ensure_local_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray once (tests share one session through this)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
