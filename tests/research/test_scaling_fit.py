"""Clark et al.'s joint law (`research.scaling_fit`) fitted to synthetic losses with known coefficients."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from research import scaling_fit

TRUE = np.array([-0.08, -0.03, 0.002, 1.4])  # a, b, c, d


def _points(noise: float, seed: int = 0):
  n = np.repeat(np.geomspace(5e4, 5e6, 5), 4)
  e = np.tile([1.0, 4.0, 16.0, 64.0], 5)
  log_l = TRUE[0] * np.log(n) + TRUE[1] * np.log(e) + TRUE[2] * np.log(n) * np.log(e) + TRUE[3]
  return n, e, np.exp(log_l + np.random.default_rng(seed).normal(0.0, noise, n.shape))


def test_exact_points_give_the_coefficients_back():
  fit = scaling_fit.fit(*_points(0.0))
  np.testing.assert_allclose(fit.coefficients, TRUE, rtol=1e-8, atol=1e-10)
  assert np.max(np.abs(fit.residuals)) < 1e-10


def test_noisy_points_give_coefficients_within_their_standard_errors():
  # Over many noise draws, each coefficient's error over its estimated standard error follows
  # Student's t with the fit's 16 degrees of freedom: 95% of draws within its 97.5% quantile.
  z = np.array(
      [
          (scaling_fit.fit(*_points(0.01, s)).coefficients - TRUE)
          / scaling_fit.fit(*_points(0.01, s)).stderr
          for s in range(200)
      ]
  )
  inside = np.mean(np.abs(z) < stats.t.ppf(0.975, df=16), axis=0)
  np.testing.assert_allclose(inside, 0.95, atol=0.04)
  fit = scaling_fit.fit(*_points(0.01, 0))
  assert fit.dof == 16 and np.std(fit.residuals) == pytest.approx(0.01, rel=0.4)


def test_a_zero_interaction_is_not_resolved_and_a_large_one_is():
  n, e, loss = _points(0.01)
  log_n, log_e = np.log(n), np.log(e)
  flat = np.exp(np.log(loss) - TRUE[2] * log_n * log_e)  # The same points with c = 0.
  assert not scaling_fit.fit(n, e, flat).resolved("c")
  strong = np.exp(np.log(flat) + 0.02 * log_n * log_e)
  assert scaling_fit.fit(n, e, strong).resolved("c")


def test_points_that_cannot_determine_the_fit_are_refused():
  n, e, loss = _points(0.0)
  with pytest.raises(ValueError, match="at least 5"):
    scaling_fit.fit(n[:4], e[:4], loss[:4])
  with pytest.raises(ValueError, match="several widths N and expert counts E"):
    scaling_fit.fit(n, np.ones_like(e), loss)
  narrow = 2e5 * (1 + 0.2 * np.arange(len(n)) / len(n))  # A router family at one size.
  with pytest.raises(ValueError, match="span a factor of 1.1"):
    scaling_fit.fit(narrow, e, loss)
