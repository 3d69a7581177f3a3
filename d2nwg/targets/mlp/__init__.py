"""The ``mlp`` target family: small classifier networks on vector inputs."""
