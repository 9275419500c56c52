"""The instance side: what runs on the rented GPU machine: converging it to an image's environment (the setup
script's steps), proving it (fingerprint, drift against the lock) and testing its GPUs before a job (selftest)."""
