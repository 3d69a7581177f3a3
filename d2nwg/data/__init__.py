"""A user's own data: labelled datasets (image folders, ``.npz``, ``.csv``, text) and instruction JSONL."""
