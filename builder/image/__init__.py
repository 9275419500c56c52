"""Where images and locks are made (a workstation or CI with a container engine and PyPI): locking the catalog and
samebox's own dev environment, rendering the Dockerfile and the setup script, pinning base images, driving the
engine."""
