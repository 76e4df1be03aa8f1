"""Custom GPU kernels (Triton), each optional: callers keep a torch path where one cannot run."""
