"""Hostile inputs: files that name code, paths that leave their folder, malformed files, Hub revisions."""
