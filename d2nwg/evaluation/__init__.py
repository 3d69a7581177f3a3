"""The evaluation protocol: generated weights against cheap baselines on held-out tasks, the
diagnostics and trust checks beside it, and the report and model card it writes."""
