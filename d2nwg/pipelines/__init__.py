"""Inference: the diffusers pipeline, the guard on its input, the folders it writes, Hub I/O."""
