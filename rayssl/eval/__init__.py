"""Evaluation of frozen features and cluster assignments: pure metrics (no Ray), one PNG plot."""
