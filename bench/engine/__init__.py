"""Engine bench: throughput sweep, decode-step timing, lateness trace, numerics."""
