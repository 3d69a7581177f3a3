"""Model zoos: the on-disk format (`model_zoo`), its typed specs, the weight layout that tokenizes
members, streamed member reads and permutation alignment."""
