"""The stall watchdog: a run that cannot make progress says why and stops, instead of waiting forever.

A training worker waits for its next batch in ``rayssl.train.prefetch.Ahead``; while it waits,
``TrainRun`` compares the wait with ``stall_limit``:

    limit = run.stall_timeout                                  before this launch's first step
    limit = max(STALL_FLOOR_S, min(run.stall_timeout, STALL_STEPS * seconds per step))   after it

Past the limit it raises ``StallError`` with one line naming what Ray cannot place: its pending
resource demands, read from the GCS (``pending_line``). The classic case is Ray Data's tasks
asking for more CPU than any node has free beside fractional training workers; ``describe``
then names ``data.cpus_per_task``. The run fails with that line (an elastic run with
``run.max_failures`` restarts at the size that fits first).

``describe``, ``stall_limit`` and ``StallError`` are Ray-free; only ``pending_line`` asks Ray.
"""

from __future__ import annotations

from rayssl.errors import find_cause

STALL_STEPS = 100  # a wait of this many step times is a stall, once the step time is known
STALL_FLOOR_S = 30.0  # ... but never a wait shorter than this


class StallError(RuntimeError):
    """No batch reached a training worker within the stall limit (one line: what is pending)."""


def stall_limit(timeout_s: float, seconds_per_step: float | None) -> float:
    """The longest wait for a batch: ``run.stall_timeout`` until a step time is known, then
    ``STALL_STEPS`` step times when shorter, never under ``STALL_FLOOR_S`` (nor over the timeout)."""
    if not seconds_per_step:
        return timeout_s
    return min(timeout_s, max(STALL_FLOOR_S, STALL_STEPS * seconds_per_step))


def _shape(bundle: dict[str, float]) -> str:
    shown = {k: v for k, v in sorted(bundle.items()) if not k.startswith(("node:", "bundle_group"))}
    return ", ".join(f"{v:g} {k}" for k, v in shown.items()) or "no resources"


def describe(tasks: list[tuple[dict[str, float], int]], groups: list[list[dict[str, float]]],
             free: list[dict[str, float]], data_cpus: float) -> str:
    """What Ray cannot place, in one sentence, from its pending ``tasks`` (``(bundle, count)``),
    pending placement ``groups`` (Ray Train's worker groups: lists of bundles) and each alive
    node's ``free`` resources; ``data_cpus``: what Ray Data's tasks ask for (``Config.data_cpus``)."""
    most = max((node.get("CPU", 0.0) for node in free), default=0.0)
    parts = []
    for bundle, count in tasks:
        cpu, plain = bundle.get("CPU", 0.0), set(bundle) <= {"CPU", "memory"}
        if plain and abs(cpu - data_cpus) < 1e-9 and cpu > most:
            parts.append(f"Ray Data's tasks need {cpu:g} CPU each ({count} waiting) and no node has {cpu:g} CPU "
                         f"free (at most {most:g}): lower data.cpus_per_task (to {most:g}) or "
                         "scaling.cpus_per_worker, or add a node")
        elif plain and cpu > most:
            parts.append(f"{count} task(s) wait for {cpu:g} CPU and no node has that free (at most {most:g}): "
                         f"Ray Data's ask data.cpus_per_task={data_cpus:g}; lower the CPUs of what else runs here "
                         "or scaling.cpus_per_worker, or add a node")
        else:
            parts.append(f"{count} task(s) wait for {_shape(bundle)} (the most CPU free on a node: {most:g})")
    for bundles in groups:
        shapes = "; ".join(_shape(b) for b in bundles)
        parts.append(f"a worker group waits for {len(bundles)} bundle(s) of {shapes}: lower scaling.num_workers "
                     "or the per-worker resources, or add nodes")
    if not parts:
        return ("Ray has no pending resource demand: the data source is slow or unreachable (check data.source "
                "and the object store), or raise run.stall_timeout for slow first reads")
    return "; ".join(parts)


def pending_line(data_cpus: float) -> str:
    """``describe`` of the cluster this process is connected to (the GCS's resource state)."""
    import ray
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.sdk import get_cluster_resource_state
    from ray.core.generated.autoscaler_pb2 import NodeStatus

    try:
        state = get_cluster_resource_state(GcsClient(address=ray.get_runtime_context().gcs_address))
    except Exception as err:  # noqa: BLE001 - the watchdog's line must not fail on the diagnosis
        return f"Ray's pending demands could not be read ({type(err).__name__})"
    tasks = [(dict(r.request.resources_bundle), r.count) for r in state.pending_resource_requests]
    groups = [[dict(b.resources_bundle) for b in g.requests] for g in state.pending_gang_resource_requests]
    alive = (NodeStatus.RUNNING, NodeStatus.IDLE)
    free = [dict(n.available_resources) for n in state.node_states if n.status in alive]
    return describe(tasks, groups, free, data_cpus)


def find_stall(err: BaseException | None) -> StallError | None:
    """The ``StallError`` behind an error Ray raised for a failed training worker: by type in its
    causes and worker failures, else by its line in their text."""
    return find_cause(err, StallError, r"(\[rayssl\] stalled: [^\n]*)")
