"""The top-level namespace shows the API and nothing else."""

from __future__ import annotations

import types

import pytest

import fastmeta


def test_dir_lists_exactly_the_public_api() -> None:
    assert dir(fastmeta) == sorted(fastmeta.__all__)
    for leaked in ("annotations", "version", "PackageNotFoundError"):
        assert leaked not in dir(fastmeta)


def test_every_public_name_resolves() -> None:
    for name in fastmeta.__all__:
        assert getattr(fastmeta, name) is not None, name
    assert isinstance(fastmeta.data, types.ModuleType)
    assert fastmeta.data.sinusoid is not None  # imported on first use
    assert isinstance(fastmeta.__version__, str)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        fastmeta.no_such_thing  # noqa: B018
