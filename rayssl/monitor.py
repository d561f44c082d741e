"""The collapse alarm: a pure rule over the logged diagnostics (no Ray, no MLflow).

docs/theory.md §6: I(X;K) = H(K) - H(K|X) is 0 under either collapse (one cluster for
every image, or the same flat posterior for every image). The alarm watches the normalised
teacher's ``norm/mutual_information`` at each logged step; every rank sees the same global
value, so every rank raises the alarm at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

METRIC = "norm/mutual_information"


@dataclass
class CollapseAlarm:
    """``observe`` returns the alarm text once I(X;K) < ``threshold`` for ``patience``
    consecutive logged steps, and None otherwise (the count restarts above the threshold)."""

    threshold: float
    patience: int
    low: int = 0
    raised: bool = False

    @classmethod
    def of(cls, monitor_cfg) -> "CollapseAlarm":
        return cls(monitor_cfg.min_mutual_information, monitor_cfg.patience)

    def observe(self, step: int, metrics: dict) -> str | None:
        value = metrics.get(METRIC)
        if value is None:
            return None
        self.low = self.low + 1 if value < self.threshold else 0
        if self.low < self.patience or self.raised:
            return None
        self.raised = True
        return (f"collapse at step {step}: I(X;K) of the normalised teacher {value:.3f} nats stayed below "
                f"monitor.min_mutual_information={self.threshold:g} for {self.patience} logged steps "
                f"(H(K) {metrics.get('norm/marginal_entropy', float('nan')):.2f}, "
                f"effective clusters {metrics.get('norm/effective_clusters', float('nan')):.1f}); "
                "use objective.mode=prior, center or sinkhorn, or raise objective.teacher_temperature")
