"""What d2nwg generates weights for: the architecture registry, one folder per target family,
closed-form heads and vmapped populations of members."""
