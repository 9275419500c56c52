"""The Docker harness's fixtures (a daemon, the test base image, a private mirror) for the setup.sh tests."""

from tests.harness import docker, private_index, test_base_image  # noqa: F401
