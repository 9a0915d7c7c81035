"""tskd.data."""
