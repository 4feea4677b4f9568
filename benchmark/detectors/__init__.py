"""Detection: the detectors (one registered function each), extra passes, scoring a job's traces."""
