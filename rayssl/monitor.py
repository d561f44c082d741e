"""The collapse alarm: a pure rule over the logged diagnostics (no Ray, no MLflow).

docs/theory.md §2 and §6: a collapsed teacher no longer tells images apart, in one of two ways,
each seen by one statistic of the normalised teacher at every logged step:

- a few clusters take every image (one-cluster or partial collapse): ``norm/effective_clusters``
  (exp H(K)) falls to a handful, watched by ``monitor.min_effective_clusters``. I(X;K) alone
  misses this: it is at most H(K), so 2-3 used clusters still give 0.7-0.9 nats, which a healthy
  run also shows in its first logged steps (calibrated in docs/benchmarks.md, "[5/5] The
  collapse alarm, calibrated"; ``benchmarks/alarm_calibration.py``).
- every image gets the same flat posterior (uniform collapse): the effective clusters stay near K
  and only ``norm/mutual_information`` falls to 0, watched by ``monitor.min_mutual_information``.

Either statistic below its threshold for ``monitor.patience`` consecutive logged steps raises
the alarm, once. Every rank sees the same global values, so every rank raises it at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rule:
    """One statistic of the alarm: ``metric`` below the value of config ``key`` means ``sign``;
    ``advice`` says what to change."""

    metric: str
    key: str
    threshold: float
    unit: str
    sign: str
    advice: str


def rules(monitor_cfg) -> tuple[Rule, ...]:
    """The alarm's rules with the thresholds of ``monitor_cfg`` (the ``monitor`` config section)."""
    return (
        Rule("norm/effective_clusters", "monitor.min_effective_clusters", monitor_cfg.min_effective_clusters, "",
             "a few clusters take every image (partial or one-cluster collapse)",
             "use objective.mode=prior or sinkhorn (they keep the clusters balanced), or raise "
             "objective.teacher_temperature"),
        Rule("norm/mutual_information", "monitor.min_mutual_information", monitor_cfg.min_mutual_information,
             " nats", "every image gets the same flat posterior (uniform collapse)",
             "lower objective.teacher_temperature (sharper targets), or use objective.mode=prior"),
    )


@dataclass
class CollapseAlarm:
    """``observe`` returns the alarm text once a rule's statistic stayed below its threshold for
    ``patience`` consecutive logged steps, and None otherwise (a rule's count restarts at a
    value at or above its threshold; steps without the statistic do not count)."""

    rules: tuple[Rule, ...]
    patience: int
    low: dict[str, int] = field(default_factory=dict)  # metric -> consecutive low logged steps
    raised: str | None = None  # the alarm's text, once raised

    @classmethod
    def of(cls, monitor_cfg) -> "CollapseAlarm":
        return cls(rules(monitor_cfg), monitor_cfg.patience)

    def observe(self, step: int, metrics: dict) -> str | None:
        for rule in self.rules:
            value = metrics.get(rule.metric)
            if value is not None:
                self.low[rule.metric] = self.low.get(rule.metric, 0) + 1 if value < rule.threshold else 0
        fired = [rule for rule in self.rules if self.low.get(rule.metric, 0) >= self.patience]
        if not fired or self.raised:
            return None
        rule = fired[0]
        self.raised = (
            f"collapse at step {step}: {rule.metric} {metrics[rule.metric]:.3g}{rule.unit} stayed below "
            f"{rule.key}={rule.threshold:g} for {self.patience} logged steps (monitor.patience): {rule.sign}; "
            f"normalised teacher: I(X;K) {metrics.get('norm/mutual_information', float('nan')):.2f} nats, "
            f"effective clusters {metrics.get('norm/effective_clusters', float('nan')):.1f}; {rule.advice}")
        return self.raised
