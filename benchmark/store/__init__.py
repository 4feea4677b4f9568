"""What a job keeps on disk: the trace store, the job folder, and its mirror on Weights & Biases."""
