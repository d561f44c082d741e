"""docs/theory.md §7.8: all-reduced statistics over W workers equal one process on the
concatenated batch, also with unequal per-worker batches (and a worker with 1 or 0 rows);
so do the evaluation protocol's (``rayssl.eval.protocol``: precise BatchNorm, the bank mean).

Two real gloo processes on 127.0.0.1; each writes its results with ``torch.save`` and the parent
compares them with the single-process computation (no process group in the parent).
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayssl.config import ObjectiveConfig
from rayssl.eval.protocol import bank_mean, precise_bn
from rayssl.objective import (
    ClusterObjective,
    global_log_prior,
    global_mean,
    information_diagnostics,
    jensen_gap,
    normalize_teacher,
    target_log_prior,
)

K = 7
TAU_T = 0.1
TAU_S = 0.2
WORLD = 2
# rows per worker; the last case has an empty worker (pure functions only)
CASES = [(5, 11), (1, 15), (11, 5), (0, 6)]
OBJ_SPECS = {
    "center": ObjectiveConfig(mode="center", num_clusters=K, student_temperature=TAU_S, center_momentum=0.7),
    "prior": ObjectiveConfig(mode="prior", num_clusters=K, student_temperature=TAU_S, prior_momentum=0.5),
    "prior_alpha": ObjectiveConfig(mode="prior", num_clusters=K, student_temperature=TAU_S, alpha=0.5,
                                   target_prior="powerlaw", prior_momentum=0.0),
    "sinkhorn": ObjectiveConfig(mode="sinkhorn", num_clusters=K, student_temperature=TAU_S, sinkhorn_iters=4),
}
LOCAL_SPECS = {name: spec.model_copy(update={"scope": "local"}) for name, spec in OBJ_SPECS.items()}
STEPS = 2


def _make_case(case: int, sizes: tuple[int, int]) -> dict:
    n = sum(sizes)
    g = torch.Generator().manual_seed(1000 + case)
    return {
        "sizes": sizes,
        "z": torch.randn(n, K, generator=g, dtype=torch.float64) * 2.0,
        # ClusterObjective: STEPS steps of teacher (2 views) and student (2 global + 2 local views)
        "teacher": [torch.randn(2, n, K, generator=g) * 3.0 + 0.5 * s for s in range(STEPS)],
        "student": [torch.randn(4, n, K, generator=g) for _ in range(STEPS)],
    }


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(3)  # the same weights on every rank and in the reference
    return torch.nn.Sequential(torch.nn.Linear(K, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                               torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double()


def _compute(case: dict, rows: slice) -> dict:
    """Everything compared; run on a worker's rows (distributed) or on all rows (reference)."""
    z = case["z"][rows]
    # precise BN batches: 3 rows each within each worker's rows (the reference takes the same
    # batches, from both workers' rows); a 1-row remainder is left out (train-mode BatchNorm needs 2)
    n0 = case["sizes"][0]
    parts = [case["z"][:n0], case["z"][n0:]] if rows == slice(None) else [z]
    batches = [b for part in parts for b in part.split(3) if len(b) > 1]
    log_q = torch.log_softmax(z / TAU_T, dim=-1)
    log_rho = target_log_prior(K)
    out = {
        "global_log_prior": global_log_prior(log_q),
        "global_mean": global_mean(z),
        "jensen_gap": jensen_gap(log_q),
        "info": information_diagnostics(log_q, log_rho),
        "bank_mean": bank_mean(z),
    }
    if batches or dist.is_initialized():  # one process without a batch has nothing to average
        bn = precise_bn(_bn_net(), batches, lambda m, x: m(x)).state_dict()
        out["precise_bn"] = {k: v for k, v in bn.items() if "running" in k or "tracked" in k}
    for mode in ("center", "prior", "sinkhorn"):
        out[f"normalize/{mode}"] = normalize_teacher(z, mode, TAU_T, sinkhorn_iters=3)
    if min(case["sizes"]) == 0:
        return out
    specs = {**OBJ_SPECS, **{f"local/{name}": spec for name, spec in LOCAL_SPECS.items()}}
    for name, spec in specs.items():
        obj = ClusterObjective(spec)
        steps = []
        for s in range(STEPS):
            teacher, student = case["teacher"][s][:, rows], case["student"][s][:, rows]
            targets = obj.targets(teacher, TAU_T).qt          # pure: the loss below sees the same state
            loss, normalised = obj(student, teacher, TAU_T)
            diag = obj.diagnostics(student, teacher, TAU_T)
            obj.update_state([normalised.stat])
            steps.append({"targets": targets, "loss": loss.detach(), "diag": diag,
                          "center": obj.center.clone(), "log_prior_ema": obj.log_prior_ema.clone()})
        out[f"obj/{name}"] = steps
    return out


def _worker(rank: int, world: int, port: int, outdir: str, cases: list) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = []
        for case in cases:
            n0 = case["sizes"][0]
            rows = slice(0, n0) if rank == 0 else slice(n0, None)
            results.append(_compute(case, rows))
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    cases = [_make_case(i, sizes) for i, sizes in enumerate(CASES)]
    outdir = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.spawn(_worker, args=(WORLD, _free_port(), outdir, cases), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("gloo workers did not finish within 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    ranks = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    assert not dist.is_initialized()          # the reference below is a true single process
    reference = [_compute(case, slice(None)) for case in cases]
    return cases, ranks, reference


def close(a, b, atol, rtol=0.0, msg=""):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(),
                               atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{a}+{b}" for a, b in CASES])
def test_global_statistics_match_single_process(distributed_results, case):
    cases, ranks, reference = distributed_results
    ref = reference[case]
    for r in range(WORLD):
        res = ranks[r][case]
        # float64 in, float64 out: exact up to summation order
        assert res["global_log_prior"].dtype == torch.float64
        close(res["global_log_prior"], ref["global_log_prior"], 1e-12, msg=f"rank {r} log prior")
        close(res["global_mean"], ref["global_mean"], 1e-12, msg=f"rank {r} mean")
        close(res["jensen_gap"], ref["jensen_gap"], 1e-12, msg=f"rank {r} jensen gap")
        close(res["bank_mean"], ref["bank_mean"], 1e-12, msg=f"rank {r} bank mean")
        for key, val in ref["precise_bn"].items():  # batches weighted by count, a 0-batch rank included
            close(res["precise_bn"][key], val, 1e-10, msg=f"rank {r} precise BN {key}")
        assert set(res["info"]) == set(ref["info"])
        for key, val in ref["info"].items():
            close(res["info"][key], val, 1e-5, 1e-5, msg=f"rank {r} info/{key}")
    # the statistics are not trivially the per-worker ones
    n0 = CASES[case][0]
    if n0 > 0:
        local = torch.log_softmax(cases[case]["z"][:n0] / TAU_T, -1).exp().mean(0).log()
        assert not torch.allclose(local, ref["global_log_prior"])


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{a}+{b}" for a, b in CASES])
@pytest.mark.parametrize("mode", ["center", "prior", "sinkhorn"])
def test_normalize_teacher_matches_single_process(distributed_results, case, mode):
    _, ranks, reference = distributed_results
    key = f"normalize/{mode}"
    got = torch.cat([ranks[r][case][key] for r in range(WORLD)])
    close(got, reference[case][key], 1e-6, 1e-5, msg=key)


@pytest.mark.parametrize("case", [i for i, s in enumerate(CASES) if min(s) > 0],
                         ids=[f"{a}+{b}" for a, b in CASES if min(a, b) > 0])
@pytest.mark.parametrize("name", list(OBJ_SPECS))
def test_cluster_objective_matches_single_process(distributed_results, case, name):
    _, ranks, reference = distributed_results
    sizes = CASES[case]
    for s, ref in enumerate(reference[case][f"obj/{name}"]):
        per_rank = [ranks[r][case][f"obj/{name}"][s] for r in range(WORLD)]
        got = torch.cat([x["targets"] for x in per_rank], dim=1)
        close(got, ref["targets"], 1e-6, 1e-5, msg=f"step {s} targets")
        # each worker's loss is its local batch mean; the batch-size weighted mean is the global loss
        weighted = sum(n * float(x["loss"]) for n, x in zip(sizes, per_rank)) / sum(sizes)
        close(weighted, ref["loss"], 1e-5, 1e-5, msg=f"step {s} loss")
        for r, x in enumerate(per_rank):
            close(x["center"], ref["center"], 1e-6, 1e-5, msg=f"step {s} rank {r} center")
            close(x["log_prior_ema"], ref["log_prior_ema"], 1e-6, 1e-5, msg=f"step {s} rank {r} ema")
            assert set(x["diag"]) == set(ref["diag"])
            for key, val in ref["diag"].items():
                close(x["diag"][key], val, 1e-4, 1e-4, msg=f"step {s} rank {r} diag {key}")


@pytest.mark.parametrize("case", [i for i, s in enumerate(CASES) if min(s) > 0],
                         ids=[f"{a}+{b}" for a, b in CASES if min(a, b) > 0])
@pytest.mark.parametrize("name", list(LOCAL_SPECS))
def test_local_scope_uses_each_workers_own_batch(distributed_results, case, name):
    """objective.scope=local: each rank's targets and state are what one process computes on
    that rank's rows alone, and differ from the global ones (so the switch does something)."""
    cases, ranks, reference = distributed_results
    n0 = CASES[case][0]
    differs = []
    for r, rows in enumerate((slice(0, n0), slice(n0, None))):
        alone = _compute(cases[case], rows)  # no process group in the parent: a single process
        for s, ref in enumerate(alone[f"obj/local/{name}"]):
            got = ranks[r][case][f"obj/local/{name}"][s]
            close(got["targets"], ref["targets"], 1e-6, 1e-5, msg=f"rank {r} step {s} local targets")
            close(got["center"], ref["center"], 1e-6, 1e-5, msg=f"rank {r} step {s} local center")
            close(got["log_prior_ema"], ref["log_prior_ema"], 1e-6, 1e-5, msg=f"rank {r} step {s} local ema")
            glob = ranks[r][case][f"obj/{name}"][s]
            differs += [not torch.allclose(got[k], glob[k], atol=1e-4) for k in ("targets", "center", "log_prior_ema")]
    assert any(differs)  # centering lags one step, so its targets differ only from the second step on
