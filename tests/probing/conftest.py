import pytest

from tests.conftest import tiny_model


@pytest.fixture
def model():
    return tiny_model()
