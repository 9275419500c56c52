"""The host side: what runs where images and locks are made (a workstation or CI with Docker and PyPI): rendering
the Dockerfile and the setup script, locking, pinning base images, driving the container engine."""
