"""Jobs: the config schema of every job kind."""
