"""What every stage shares: constrained config types, devices, the trainers' loop, profiling."""
