"""Reports built from job folders (read through benchmark.jobfolder: metrics.json, config.yaml, tables)."""
