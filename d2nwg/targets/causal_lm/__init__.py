"""The ``causal-lm-adapter`` target family: a LoRA/MiSS adapter on a slice of a causal LM,
judged on what it generates."""
