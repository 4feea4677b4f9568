"""Reports built from job folders (read through benchmark.store.job_folder: metrics.json, config.yaml, tables)."""
