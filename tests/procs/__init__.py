"""Programs the crash tests run as real processes (and kill with SIGKILL)."""
