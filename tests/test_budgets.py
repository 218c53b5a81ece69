import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvsqueeze.budgets import Uniform
from kvsqueeze.methods.pyramidkv import Pyramid


@given(n=st.integers(1, 10_000), ratio=st.floats(0, 0.999))
def test_uniform_ratio_keeps_the_complement(n, ratio):
    k = Uniform(ratio=ratio).n_keep(n)
    assert 0 <= k <= n and abs(k - n * (1 - ratio)) < 1


@given(n=st.integers(100, 20_000), ratio=st.floats(0.05, 0.95), layers=st.integers(2, 80),
       window=st.integers(0, 64), beta=st.floats(1, 40))
def test_pyramid_keeps_the_uniform_average_and_shrinks_with_depth(n, ratio, layers, window, beta):
    base = Uniform(ratio=ratio)
    pyramid = Pyramid(base, beta=beta, window=window)
    budgets = [pyramid.n_keep(n, i, layers) for i in range(layers)]
    assert budgets == sorted(budgets, reverse=True)
    assert all(1 <= b <= n for b in budgets)
    assert sum(budgets) / layers == pytest.approx(base.n_keep(n), abs=1)


@pytest.mark.parametrize("kwargs", [{"ratio": 1.0}, {"ratio": -0.1}, {"ratio": 1.5}, {"tokens": 0}, {"tokens": -3},
                                    {"tokens": 2.5}, {"ratio": 0.5, "tokens": 10}])
def test_bad_budgets_are_refused(kwargs):
    with pytest.raises(ValueError):
        Uniform(**kwargs)
