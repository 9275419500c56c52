"""The Docker harness's fixtures (a daemon, the test base image) for the setup.sh tests."""

from tests.harness import docker, test_base_image  # noqa: F401
