"""Reports built from job folders (metrics.json + generations.csv + .hydra/config.yaml)."""
