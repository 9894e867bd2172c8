"""``clipcurate submit``: run a workflow as a Ray Job and stream its logs.

Token authentication (Ray >= 2.60): ``ray start --head`` turns it on when it finds a token
(``RAY_AUTH_TOKEN``, the file at ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``, which any local
``ray.init()`` creates), and a Ray client sends its token only when ``RAY_AUTH_MODE=token``. So when
``RAY_AUTH_MODE`` is unset and a token is found in one of those places, ``submit`` sets
``RAY_AUTH_MODE=token`` for itself (``enable_token_auth``). A cluster that refuses the request (no
token, or another token) and a dashboard that cannot be reached end ``submit`` with one line.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path

from pipeline.config import ConfigError

log = logging.getLogger("clipcurate")

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def find_token() -> str | None:
    """Where Ray's client would find a token (the places Ray reads, in its order), or None."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return f"${TOKEN_ENV}"
    path = os.environ.get(TOKEN_PATH_ENV)
    if path:
        return f"{TOKEN_PATH_ENV}={path}" if Path(path).expanduser().is_file() else None
    p = default_token_path()
    return str(p) if p.is_file() else None


def enable_token_auth() -> str | None:
    """Set ``RAY_AUTH_MODE=token`` for this process when it is unset and a token is found; returns
    where the token is (None: none found, or the mode was set by the user)."""
    if os.environ.get(AUTH_MODE_ENV) is not None:
        return None
    where = find_token()
    if where is None:
        return None
    os.environ[AUTH_MODE_ENV] = "token"
    try:  # Ray reads the mode into its config at import: make an imported Ray see it
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass
    return where


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def explain(e: BaseException, address: str | None, token: str | None) -> str:
    """One line for an error of the Job API client (``e``) at ``address``."""
    where = f"the Ray cluster at {address or os.environ.get('RAY_ADDRESS') or '(auto)'}"
    text = str(e)
    if type(e).__name__ == "AuthenticationError" or "Unauthorized" in text or "Forbidden" in text:
        if "Forbidden" in text:  # HTTP 403: a token was sent and is not the cluster's
            return (
                f"{where} refused the authentication token ({token or 'from ' + AUTH_MODE_ENV + '=token'}): "
                f"use the cluster's token (print it on the head with `ray get-auth-token`)"
            )
        path = os.environ.get(TOKEN_PATH_ENV)
        missing = (
            f" ({TOKEN_PATH_ENV}={path} is not a file)"
            if path and not Path(path).expanduser().is_file()
            else ""
        )
        return (
            f"{where} uses token authentication and no token was found{missing}: put the cluster's token "
            f"(`ray get-auth-token` on the head) in {default_token_path()}, or set {TOKEN_PATH_ENV} or {TOKEN_ENV}"
        )
    return f"cannot submit to {where}: {type(e).__name__}: {_one_line(e)}"


def submit(
    workflow: str,
    address: str | None,
    args: list[str],
    working_dir: str,
    runtime_env: dict,
    note: str | None = None,
) -> int:
    """Submit ``python -m pipeline run WORKFLOW ARGS`` as a Ray Job, stream its logs, return its exit
    code (``note``: printed once the job is in). Raises ``ConfigError`` (one line) when the job cannot
    be submitted."""
    token = enable_token_auth()
    from ray.job_submission import JobStatus, JobSubmissionClient

    env = dict(runtime_env)
    env["working_dir"] = working_dir
    entry = " ".join(["python", "-m", "pipeline", "run", workflow, *[shlex.quote(a) for a in args]])
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entry, runtime_env=env)
    except Exception as e:  # noqa: BLE001 - every way of not getting a job in ends in one line
        raise ConfigError(explain(e, address, token)) from None
    print(f"submitted job {job_id}: {entry}", flush=True)
    if note:
        print(note, flush=True)
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
