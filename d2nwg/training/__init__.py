"""Training the hyper-model with Lightning: the module, the zoo data module, the two stages,
callbacks, distributed bookkeeping, the LightningCLI entry and the provenance an export records."""
