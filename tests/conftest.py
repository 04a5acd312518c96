"""Fixtures shared by the test modules."""
import pytest
import torchvision


@pytest.fixture
def offline(monkeypatch):
    """Make torchvision's MNIST download fail as it does without a network, whatever the machine allows."""
    def no_network(self):
        raise RuntimeError("Error downloading: no network")
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
