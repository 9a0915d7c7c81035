"""tskd.stages."""
