"""The rented GPU machine: converging it to an image's environment (the setup script's steps) and proving it
(fingerprint, drift against the lock). The GPU self-test is builder/selftest/."""
