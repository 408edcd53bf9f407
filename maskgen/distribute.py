"""Run shard jobs: on Ray (local on loopback, or an existing cluster) or in-process.

The local default binds every Ray process to 127.0.0.1 and starts no dashboard, so nothing
on the network can submit work to the user's machine. ``--ray-address`` connects to the
user's own cluster as given (the output folder must then be on storage every node sees).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from maskgen.sources import ItemRef
from maskgen.worker import BuildSpec, process_shard

# The private local instance's environment (set before Ray starts any process; each can be
# overridden from the shell):
# - RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: on Linux, the node IP Ray picks (and rewrites addresses
#   to) is the loopback one;
# - RAY_AUTH_MODE=token: Ray's own default for a new local instance (a token in ~/.ray), said
#   explicitly so that Ray does not warn about it on every build;
# - RAY_USAGE_STATS_ENABLED=0: no usage report leaves the machine. Ray 2.60 still starts its
#   dashboard head (API server, frontend disabled, UsageStatsHead module only; a TODO in
#   ray/_private/services.py) and a DashboardAgent per node even with include_dashboard=False:
#   there is no switch for them, so they run, bound to 127.0.0.1 like every other process.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
}
MAX_TASK_RETRIES = 3  # for lost workers/nodes; a retried shard is byte-identical


@dataclass
class ShardJob:
    index: int
    items: list[ItemRef]


@dataclass
class ShardOutcome:
    index: int
    stats: dict[str, Any] | None
    error: str | None = None


def run_local(spec: BuildSpec, jobs: Iterable[ShardJob]) -> Iterable[ShardOutcome]:
    """Process shards one after another in this process (debugging, tests, --workers 0)."""
    for job in jobs:
        try:
            yield ShardOutcome(job.index, process_shard(spec, job.index, job.items))
        except Exception as exc:  # a bug in a method must not lose the other shards
            yield ShardOutcome(job.index, None, f"{type(exc).__name__}: {exc}")


def run_ray(
    spec: BuildSpec,
    jobs: list[ShardJob],
    workers: int,
    address: str | None,
    num_cpus_per_task: float = 1.0,
    num_gpus_per_task: float = 0.0,
) -> Iterable[ShardOutcome]:
    """One Ray task per shard; yields as shards finish.

    On the local instance started here, ``workers`` CPUs bound the concurrency and twice as
    many tasks are queued to keep them busy; on an existing cluster ``workers`` is the
    number of tasks in flight.
    """
    if address is None:
        for k, v in LOOPBACK_ENV.items():
            os.environ.setdefault(k, v)
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if address is None:
            # "local": always a private instance, even when a `ray start` cluster runs here
            ray.init(
                address="local",
                num_cpus=workers,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                **common,
            )
        else:
            ray.init(address=address, **common)
    try:
        task = ray.remote(process_shard).options(
            num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task, max_retries=MAX_TASK_RETRIES
        )
        spec_ref = ray.put(spec)
        pending: dict[Any, int] = {}
        queue = list(jobs)
        max_in_flight = max(1, 2 * workers if started_here and address is None else workers)
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                job = queue.pop(0)
                pending[task.remote(spec_ref, job.index, job.items)] = job.index
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    yield ShardOutcome(index, ray.get(ref))
                except Exception as exc:
                    cause = getattr(exc, "cause", None) or exc
                    yield ShardOutcome(index, None, f"{type(cause).__name__}: {cause}")
    finally:
        if started_here:
            ray.shutdown()


def run_jobs(
    spec: BuildSpec,
    jobs: list[ShardJob],
    workers: int,
    address: str | None,
    executor: str,
    resources: tuple[float, float] = (1.0, 0.0),
) -> Iterable[ShardOutcome]:
    if executor == "local":
        return run_local(spec, jobs)
    return run_ray(spec, jobs, workers, address, *resources)
