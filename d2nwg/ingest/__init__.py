"""``d2nwg zoo ingest``: a `ModelZoo` from a user's own checkpoints (`build.ingest`), step by step."""
