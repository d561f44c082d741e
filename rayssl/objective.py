"""The clustering SSL objective of docs/theory.md, as pure torch.

Notation (docs/theory.md §0): K clusters, global batch i = 1..N summed over *all* workers, teacher
logits z_i, student logits s_i, temperatures tau_t and tau_s.

    q_i  = softmax(z_i / tau_t)        raw teacher posterior
    qt_i = normalised teacher target   (one of the modes below)
    p_i  = softmax(s_i / tau_s)        student posterior

    L = mean over (teacher view v', student view v != v') of  mean_i CE(qt_i^{v'}, p_i^{v})

The modes form one family (docs/theory.md §5):

    none      qt = softmax(z / tau_t)                                  collapses (control)
    center    qt = softmax((z - c) / tau_t),  c = EMA of the batch mean   Jensen bound (DINO)
    prior     log qt = log_softmax(z / tau_t - alpha log pi + log rho)     inverse cluster prior
    sinkhorn  the prior step repeated n times                               Sinkhorn-Knopp

Every global statistic is a *sum* and a *count* all-reduced separately (``rayssl.dist``: all
ranks together when a process group is up, the identity otherwise), so W workers with unequal batches
give exactly what one process gives on the concatenated batch. Nothing here knows about Ray.

Training's entry point is ``ClusterObjective.forward`` (``targets``, then ``cross_entropy_loss``),
once per micro-batch; ``ClusterObjective.update_state`` folds the step's batch statistics into the
state once per optimizer step, the one function here that changes anything (docs/theory.md §8).
The settings are ``rayssl.config.ObjectiveConfig``, the ``objective.*`` section of the config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rayssl import dist
from rayssl.config import ObjectiveConfig  # the one definition of the objective's settings (pydantic only)
from rayssl.names import MODES, SCOPES, TARGET_PRIORS  # noqa: F401 - the objective's choices, by name


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it is: the objective's arithmetic under bf16 autocast, or in a
    float64 run."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------- global reductions
def global_sum(x: Tensor, local: bool = False) -> Tensor:
    """Sum of ``x`` over all workers (a copy; the identity in a single process or if ``local``)."""
    return x.clone() if local else dist.all_sum(x)


def global_max(x: Tensor, local: bool = False) -> Tensor:
    """Element-wise max of ``x`` over all workers (a copy; the identity in a single process or if ``local``)."""
    return x.clone() if local else dist.all_max(x)


def global_log_sum_exp(log_x: Tensor, local: bool = False) -> tuple[Tensor, Tensor]:
    """Global ``log sum_i exp(log_x_ik)`` per column, and the global row count N.

    Stays in the log domain: each column is shifted by its global max M_k before the linear
    sum is all-reduced, ``lse_k = M_k + log sum_i exp(log_x_ik - M_k)``. The count travels in
    the same SUM collective as the sums but is a separate element, never a weight.
    ``local=True`` keeps this worker's rows only (the ``objective.scope=local`` ablation).
    """
    local_max = log_x.amax(dim=0) if log_x.shape[0] else torch.full_like(log_x[0:1].sum(0), -math.inf)
    m = global_max(local_max.detach(), local).clamp_min(torch.finfo(log_x.dtype).min)
    # Terms are floored at sqrt(smallest normal float) (1e-19 in float32): each column's sum holds
    # exp(0) = 1, which absorbs them, and exp near the subnormal range is much slower on x86 CPUs.
    shifted = (log_x - m).clamp_min(math.log(torch.finfo(log_x.dtype).tiny) / 2)
    packed = torch.cat([torch.exp(shifted).sum(dim=0), log_x.new_tensor([log_x.shape[0]])])
    packed = global_sum(packed, local)
    return m + torch.log(packed[:-1]), packed[-1]


# --------------------------------------------------------------------------- pure math
def log_prior(log_probs: Tensor) -> Tensor:
    """Cluster marginal of a batch in the log domain (single process).

        log pi_k = logsumexp_i(log q_ik) - log N

    Averaging probabilities underflows at tau_t = 0.04; this does not.
    """
    return torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])


def global_log_prior(log_probs: Tensor, local: bool = False) -> Tensor:
    """``log_prior`` over the global batch: sums and counts all-reduced separately
    (over this worker's batch if ``local``)."""
    lse, n = global_log_sum_exp(log_probs, local)
    return lse - torch.log(n)


def global_mean(x: Tensor, local: bool = False) -> Tensor:
    """Column mean over the global batch, ``c = sum_i x_i / N`` (sum and N all-reduced;
    this worker's rows only if ``local``)."""
    packed = global_sum(torch.cat([x.sum(dim=0), x.new_tensor([x.shape[0]])]), local)
    return packed[:-1] / packed[-1]


def target_log_prior(num_clusters: int, kind: str = "uniform", exponent: float = 1.0) -> Tensor:
    """log rho: the target cluster marginal.

    ``uniform``: rho_k = 1/K.  ``powerlaw``: rho_k proportional to k^-exponent (k = 1..K),
    for datasets whose classes follow a long tail.
    """
    if kind == "uniform":
        return torch.full((num_clusters,), -math.log(num_clusters))
    if kind == "powerlaw":
        logits = -exponent * torch.log(torch.arange(1, num_clusters + 1, dtype=torch.float32))
        return torch.log_softmax(logits, dim=0)
    raise ValueError(f"objective.target_prior: unknown prior {kind!r}; choose one of {TARGET_PRIORS}")


def prior_step(log_q: Tensor, log_pi: Tensor, log_rho: Tensor, alpha: float = 1.0) -> Tensor:
    """One inverse-prior normalisation of posteriors given in the log domain.

        log qt_i = log_softmax(log q_i - alpha log pi + log rho)

    With pi = rho and alpha = 1 this is the identity (docs/theory.md §3.1, §7.1).
    """
    return torch.log_softmax(log_q - alpha * log_pi + log_rho, dim=-1)


def prior_targets(log_q: Tensor, log_pi: Tensor, log_rho: Tensor, alpha: float = 1.0) -> Tensor:
    """``prior_step`` in probabilities, the teacher targets:

        qt_i = exp(prior_step(log q_i)) = softmax(log q_i - alpha log pi + log rho)

    Computed with ``softmax`` (one fused pass) rather than ``exp`` of the log result: most
    log-probabilities at tau_t = 0.04 lie below log(FLT_MIN), where ``exp`` makes subnormals,
    much slower on x86 CPUs (docs/benchmarks.md, objective overhead).
    """
    return torch.softmax(log_q + (log_rho - alpha * log_pi), dim=-1)  # the K-vector first: one pass less


def sinkhorn(log_q: Tensor, log_rho: Tensor, iters: int, alpha: float = 1.0, local: bool = False) -> Tensor:
    """n repeated prior steps, each with the global marginal of the previous iterate.

        log qt^(0) = log q,   log qt^(n+1) = log_softmax(log qt^(n) - alpha log pi(qt^(n)) + log rho)

    This is Sinkhorn-Knopp started from the row softmax (SwAV, DINOv2); the marginal's KL to
    rho falls geometrically with n (docs/theory.md §3.6, §7.7).
    """
    for _ in range(iters):
        log_q = prior_step(log_q, global_log_prior(log_q, local), log_rho, alpha)
    return log_q


def normalize_teacher(
    logits: Tensor,
    mode: str,
    temperature: float,
    *,
    center: Tensor | None = None,
    log_pi: Tensor | None = None,
    log_rho: Tensor | None = None,
    alpha: float = 1.0,
    sinkhorn_iters: int = 3,
    local: bool = False,
) -> Tensor:
    """Teacher targets qt (probabilities, no gradient) for ``logits`` (N, K).

    - ``none``:     softmax(z / tau_t)
    - ``center``:   softmax((z - c) / tau_t); ``center`` defaults to the global batch mean of z
    - ``prior``:    softmax(z / tau_t - alpha log pi + log rho); ``log_pi`` defaults to the global
                    log marginal of softmax(z / tau_t)
    - ``sinkhorn``: ``prior`` repeated ``sinkhorn_iters`` times

    ``log_rho`` defaults to the uniform prior. ``local=True`` takes the batch statistics (c, pi)
    over this worker's rows instead of the global batch: the ``objective.scope=local`` ablation.
    """
    with torch.no_grad():
        z = at_least_fp32(logits)
        if mode == "none":
            return torch.softmax(z / temperature, dim=-1)
        if mode == "center":
            c = global_mean(z, local) if center is None else center
            return torch.softmax((z - c) / temperature, dim=-1)
        if log_rho is None:
            log_rho = target_log_prior(z.shape[-1]).to(z.device)
        log_q = torch.log_softmax(z / temperature, dim=-1)
        if mode == "prior":
            lp = global_log_prior(log_q, local) if log_pi is None else log_pi
            return prior_targets(log_q, lp, log_rho, alpha)
        if mode == "sinkhorn" and sinkhorn_iters == 0:
            return log_q.exp()
        if mode == "sinkhorn":  # the last of the iterations straight to probabilities
            log_q = sinkhorn(log_q, log_rho, sinkhorn_iters - 1, alpha, local)
            return prior_targets(log_q, global_log_prior(log_q, local), log_rho, alpha)
    raise ValueError(f"objective.mode: unknown mode {mode!r}; choose one of {MODES}")


def cross_entropy_loss(student_logits: Tensor, targets: Tensor, student_temperature: float) -> Tensor:
    """DINO's multi-view cross-entropy.

        L = 1/P sum_{v' teacher, v student, v != v'} mean_i -sum_k qt_ik^{v'} log p_ik^{v}

    ``student_logits`` (Vs, B, K) with the global views first, ``targets`` (Vt, B, K) the
    teacher targets of the Vt global views. Since qt is constant, this equals the KL objective
    up to H(qt), and d L / d s = (p - qt) / tau_s per pair (docs/theory.md §1, §7.9).
    """
    log_p = torch.log_softmax(at_least_fp32(student_logits) / student_temperature, dim=-1)
    total, pairs = log_p.new_zeros(()), 0
    for t in range(targets.shape[0]):
        for v in range(log_p.shape[0]):
            if v != t:
                total = total - (targets[t] * log_p[v]).sum(dim=-1).mean()
                pairs += 1
    return total / pairs


# --------------------------------------------------------------------------- diagnostics
def _entropy_rows(log_probs: Tensor) -> Tensor:
    """-sum_k q_k log q_k per row, with 0 log 0 = 0 (exact zeros are common at tau_t = 0.04)."""
    p = log_probs.exp()
    return -torch.where(p > 0, p * log_probs, torch.zeros_like(p)).sum(dim=-1)


def information_diagnostics(log_probs: Tensor, log_rho: Tensor) -> dict[str, Tensor]:
    """Information-theoretic diagnostics of posteriors (N, K) over the global batch.

        H(K)   = -sum_k pi_k log pi_k              marginal entropy; exp H(K) = effective clusters
        H(K|X) = -(1/N) sum_i sum_k q_ik log q_ik  conditional entropy
        I(X;K) = H(K) - H(K|X)                     0 under either collapse: the alarm
        KL(pi || rho)                              distance of the marginal from the target
        unused = #{k : no sample has argmax k}
    """
    log_probs = log_probs.float()
    k = log_probs.shape[-1]
    log_pi = global_log_prior(log_probs)
    pi = log_pi.exp()
    hist = torch.bincount(log_probs.argmax(dim=-1), minlength=k).float()
    sums = global_sum(torch.cat([_entropy_rows(log_probs).sum().reshape(1), hist,
                                 log_probs.new_tensor([log_probs.shape[0]])]))
    h_marginal = -(torch.where(pi > 0, pi * log_pi, torch.zeros_like(pi))).sum()
    h_conditional = sums[0] / sums[-1]
    return {
        "marginal_entropy": h_marginal,
        "conditional_entropy": h_conditional,
        "mutual_information": h_marginal - h_conditional,
        "effective_clusters": h_marginal.exp(),
        "kl_to_target": (torch.where(pi > 0, pi * (log_pi - log_rho), torch.zeros_like(pi))).sum(),
        "unused_clusters": (sums[1:-1] == 0).sum().float(),
    }


def jensen_gap(log_q: Tensor) -> Tensor:
    """Per-cluster Jensen gap Delta_k = log pi_k - log G_k >= 0 over the global batch.

    log G_k = mean_i log q_ik is the log geometric mean; centering divides by G, prior
    normalisation by pi, and the two agree iff Delta_k is constant in k (docs/theory.md §4).
    """
    return global_log_prior(log_q) - global_mean(log_q)


# --------------------------------------------------------------------------- the objective with its state
class TeacherTargets(NamedTuple):
    """What ``ClusterObjective.targets`` returns for teacher logits z (Vt, B, K).

    - ``qt``: the normalised targets (Vt, B, K), no gradient (docs/theory.md §5);
    - ``stat``: the micro-batch's statistic for ``ClusterObjective.update_state``, already
      all-reduced over the global batch (``objective.scope=local``: this worker's rows):
      ``center``: ``c_batch = sum_i z_i / N``; ``prior``: ``log pi_used``
      (docs/theory.md §3.5); ``none`` and ``sinkhorn``: ``None`` (no state).
    """

    qt: Tensor
    stat: Tensor | None


class ClusterObjective(nn.Module):
    """The loss of docs/theory.md §1 with its state: the EMA center (``center``, §4) and the EMA
    log prior (``log_prior_ema``, §3.5), in buffers, so a checkpoint of ``state_dict`` carries them.
    ``cfg`` is the ``objective.*`` section of the config (``rayssl.config.ObjectiveConfig``).

    One optimizer step of ``a`` micro-batches j = 1..a (``rayssl.train.step.Stepper``):

        (L_j, T_j) = forward(s_j, z_j, tau_t)              L_j = CE(T_j.qt, p_j); reads the state only
        update_state([T_1.stat, ..., T_a.stat])            after the optimizer step; skipped with it

    so every micro-batch of a step sees the same state, as one large batch would, and a skipped
    step leaves the state as it was. The center starts at 0 (the first step's target is the raw
    softmax), the EMA prior at rho.

    ``scope``: ``global`` takes c_batch, pi_batch and Sinkhorn's marginals over the global batch
    (docs/theory.md §3.4); ``local`` over each worker's own batch, an ablation whose state then differs
    between workers. The diagnostics are always over the global batch.
    """

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__()
        if cfg.mode not in MODES:
            raise ValueError(f"objective.mode: unknown mode {cfg.mode!r}; choose one of {MODES}")
        if cfg.scope not in SCOPES:
            raise ValueError(f"objective.scope: unknown scope {cfg.scope!r}; choose one of {SCOPES}")
        self.cfg = cfg.model_copy()  # the buffers below are sized by it: later edits of the caller's copy do not apply
        k = cfg.num_clusters
        self.register_buffer("log_rho", target_log_prior(k, cfg.target_prior, cfg.target_prior_exponent))
        self.register_buffer("center", torch.zeros(k))
        self.register_buffer("log_prior_ema", self.log_rho.clone())
        self._local = cfg.scope == "local"

    def _batch_log_pi(self, log_q: Tensor) -> Tensor:
        """``log pi_used = log(m pi_ema + (1 - m) pi_batch)`` (m = ``prior_momentum``; m = 0: ``log pi_batch``)."""
        m = self.cfg.prior_momentum
        log_pi = global_log_prior(log_q, self._local)
        if m > 0:
            log_pi = torch.logaddexp(math.log(m) + self.log_prior_ema, math.log1p(-m) + log_pi)
        return log_pi

    @torch.no_grad()
    def targets(self, teacher_logits: Tensor, teacher_temperature: float) -> TeacherTargets:
        """The targets qt of teacher logits z (Vt, B, K) with the current state, and the batch
        statistic of the state update. Pure: it reads the state and changes nothing.

            center:   qt = softmax((z - c) / tau_t),                  stat = c_batch = sum_i z_i / N
            prior:    qt = softmax(z / tau_t - alpha log pi_used + log rho),
                      pi_used = m pi_ema + (1 - m) pi_batch,          stat = log pi_used
            none, sinkhorn: ``normalize_teacher`` (no state),         stat = None

        ``c`` is the center before this step's update (it lags one step, as DINO's).
        """
        s = self.cfg
        z = at_least_fp32(teacher_logits).flatten(0, 1)
        stat = None
        if s.mode == "center":
            stat = global_mean(z, self._local)
            out = normalize_teacher(z, "center", teacher_temperature, center=self.center)
        elif s.mode == "prior":
            log_q = torch.log_softmax(z / teacher_temperature, dim=-1)
            stat = self._batch_log_pi(log_q)
            out = prior_targets(log_q, stat, self.log_rho, s.alpha)
        else:
            out = normalize_teacher(z, s.mode, teacher_temperature, log_rho=self.log_rho,
                                    alpha=s.alpha, sinkhorn_iters=s.sinkhorn_iters, local=self._local)
        return TeacherTargets(out.view_as(teacher_logits), stat)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                teacher_temperature: float) -> tuple[Tensor, TeacherTargets]:
        """The loss of one micro-batch (docs/theory.md §1), the entry point training calls:

            qt = targets(z)                                          (no gradient; §5)
            L  = 1/P sum_{v' teacher, v student, v != v'} mean_i CE(qt_i^{v'}, p_i^{v}),  p = softmax(s / tau_s)

        ``student_logits`` (Vs, B, K) with the global views first, ``teacher_logits`` (Vt, B, K).
        Returns ``(L, targets)``; pass ``targets.stat`` of every micro-batch of the step to
        ``update_state`` after the optimizer step. Changes no state.
        """
        teacher = self.targets(teacher_logits, teacher_temperature)
        return cross_entropy_loss(student_logits, teacher.qt, self.cfg.student_temperature), teacher

    @torch.no_grad()
    def update_state(self, stats: Sequence[Tensor | None]) -> None:
        """Fold one optimizer step's micro-batch statistics (``TeacherTargets.stat``, j = 1..a)
        into the state; call once per optimizer step, after it (docs/theory.md §3.5, §4):

            center:  c <- m c + (1 - m) (1/a) sum_j c_batch_j          (m = ``center_momentum``)
            prior:   log pi_ema <- log (1/a) sum_j pi_used_j
            none, sinkhorn, or no statistics: nothing
        """
        kept = [s for s in stats if s is not None]
        if not kept:
            return
        stat = torch.stack(kept)
        if self.cfg.mode == "center":
            m = self.cfg.center_momentum
            self.center.mul_(m).add_(stat.mean(0), alpha=1 - m)
        else:  # prior: log of the mean over micro-batches of pi_used
            self.log_prior_ema.copy_(torch.logsumexp(stat, dim=0) - math.log(len(stat)))

    @torch.no_grad()
    def diagnostics(self, student_logits: Tensor, teacher_logits: Tensor, teacher_temperature: float) -> dict[str, float]:
        """docs/theory.md §6 for the raw teacher, the normalised teacher and the student.

        Uses the state as it stands and changes nothing. Names: ``{raw,norm,student}/<stat>``,
        ``jensen_gap_mean``, ``jensen_gap_std`` and ``kl_teacher_student`` (each student global
        view against the other view's target, as in the loss).
        """
        vt = teacher_logits.shape[0]
        z = at_least_fp32(teacher_logits).flatten(0, 1)
        log_q = torch.log_softmax(z / teacher_temperature, dim=-1)
        qt = self.targets(teacher_logits, teacher_temperature).qt.flatten(0, 1)
        log_qt = torch.log(qt.clamp_min(torch.finfo(qt.dtype).tiny))
        s = at_least_fp32(student_logits[:vt].flip(0)).flatten(0, 1)
        log_p = torch.log_softmax(s / self.cfg.student_temperature, dim=-1)
        out: dict[str, Tensor] = {}
        for name, lp in (("raw", log_q), ("norm", log_qt), ("student", log_p)):
            for key, val in information_diagnostics(lp, self.log_rho).items():
                out[f"{name}/{key}"] = val
        gap = jensen_gap(log_q)
        out["jensen_gap_mean"], out["jensen_gap_std"] = gap.mean(), gap.std()
        kl = global_mean((qt * (log_qt - log_p)).sum(-1, keepdim=True))
        out["kl_teacher_student"] = kl[0]
        return {k: float(v) for k, v in out.items()}
