"""tskd."""
