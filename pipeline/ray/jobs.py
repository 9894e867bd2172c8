"""``clipcurate submit``: run a workflow as a Ray Job and stream its logs."""

from __future__ import annotations

import logging
import shlex
import time

log = logging.getLogger("clipcurate")


def submit(workflow: str, address: str | None, args: list[str], working_dir: str, runtime_env: dict) -> int:
    """Submit ``python -m pipeline run WORKFLOW ARGS`` as a Ray Job, stream its logs, return its exit code."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    env = dict(runtime_env)
    env["working_dir"] = working_dir
    entry = " ".join(["python", "-m", "pipeline", "run", workflow, *[shlex.quote(a) for a in args]])
    job_id = client.submit_job(entrypoint=entry, runtime_env=env)
    print(f"submitted job {job_id}: {entry}", flush=True)
    import asyncio

    async def _tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(_tail())
    except Exception as e:  # noqa: BLE001 - log streaming is best effort; the status is what counts
        log.warning("log streaming stopped: %s", e)
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
