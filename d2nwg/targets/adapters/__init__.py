"""What the adapter families share: adapter kinds and layer slices, the frozen base,
packaged bases, base identity and legacy Bone folders."""
