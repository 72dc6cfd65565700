"""Shared fixtures: a temporary tracking store, tiny synthetic data, colour-coded digits, a
PostgreSQL server.
Helpers live in tests/support/."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two test processes on two cores:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread each, children included

from support.digits import colour_images, svhn_labels  # noqa: E402
from support.postgres import available, postgres  # noqa: E402
from support.store import Store, kept_if_failed  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def template_store(tmp_path_factory, data_dir) -> Path:
    """One store MLflow creates and migrates, per test process: each test's store is a copy."""
    root = tmp_path_factory.mktemp("template-store")
    Store(root, data_dir).initialise()
    return root


@pytest.fixture
def store(tmp_path, data_dir, template_store) -> Store:
    return Store(tmp_path, data_dir).initialise(template_store)


@pytest.fixture(scope="module")
def module_store(request, tmp_path_factory, data_dir, template_store):
    with kept_if_failed(request, tmp_path_factory.mktemp("store")) as root:
        yield Store(root, data_dir).initialise(template_store)


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory):
    """Two SVHN-format folders with the same images: `right` labels, and `shifted`, whose training
    labels are each digit plus one, so training on it makes the test accuracy fall."""
    from pipeline import synthetic

    root = tmp_path_factory.mktemp("colours")
    train_images, train_labels = colour_images(256, 1)
    test_images, test_labels = colour_images(128, 2)
    for name, labels in (("right", train_labels), ("shifted", (train_labels + 1) % 10)):
        synthetic.write_mat(root / name / "train_32x32.mat", train_images, svhn_labels(labels))
        synthetic.write_mat(root / name / "test_32x32.mat", test_images, svhn_labels(test_labels))
    return root


@pytest.fixture(scope="module")
def database():
    """A real PostgreSQL 15 on 127.0.0.1 for the module's tests (skipped where there is none)."""
    if available():
        pytest.skip(available())
    with postgres() as server:
        yield server
