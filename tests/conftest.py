"""Pytest fixtures; the models and data live in helpers.py."""

from __future__ import annotations

import pytest

from helpers import FACTORIES, make_case


@pytest.fixture(params=sorted(FACTORIES))
def case(request):
    return (request.param, *make_case(request.param, seed=sum(map(ord, request.param))))
