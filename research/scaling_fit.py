"""Clark et al. 2022's joint scaling law of dense and routed models, fitted by least squares.

    log L(N, E) = a log N + b log E + c log N log E + d

N is the model's active non-embedding parameter count (what a token passes through outside the
embedding: the dense model's size in Clark et al.'s "Unified Scaling Laws for Routed Language
Models", Eq. 2, where N is the parameter count of the dense base model), E the number of experts (1
for a dense model, so log E = 0). b < 0 says experts help; c > 0 says the help shrinks as N grows.
Ordinary least squares in (log N, log E) with `numpy.linalg.lstsq`; standard errors from the
residual variance and (X^T X)^-1, which assumes independent, equal-variance residuals in log L.
"""

from __future__ import annotations

import dataclasses

import numpy as np

COEFFICIENTS = ("a", "b", "c", "d")
MIN_N_SPAN = 2.0  # Largest over smallest N; Clark et al. span N over two orders of magnitude.


@dataclasses.dataclass(frozen=True)
class Fit:
  """Fitted coefficients (a, b, c, d), their standard errors and the residuals in log L."""

  coefficients: np.ndarray
  stderr: np.ndarray
  residuals: np.ndarray
  dof: int  # Points minus coefficients.

  def value(self, name: str) -> tuple[float, float]:
    i = COEFFICIENTS.index(name)
    return float(self.coefficients[i]), float(self.stderr[i])

  def predict(self, n, e) -> np.ndarray:
    return np.exp(_design(n, e) @ self.coefficients)

  def resolved(self, name: str, sigmas: float = 2.0) -> bool:
    """Whether a coefficient differs from 0 by more than `sigmas` standard errors."""
    value, se = self.value(name)
    return bool(np.isfinite(se) and abs(value) > sigmas * se)


def _design(n, e) -> np.ndarray:
  log_n, log_e = np.log(np.asarray(n, np.float64)), np.log(np.asarray(e, np.float64))
  return np.stack([log_n, log_e, log_n * log_e, np.ones_like(log_n)], axis=-1)


def fit(n, e, loss) -> Fit:
  """Fits log L = a log N + b log E + c log N log E + d to the points (N, E, L).

  Raises:
    ValueError: fewer than 5 points, points that do not determine the four coefficients (all
      E equal, or all N equal), or sizes N that span less than a factor of `MIN_N_SPAN` (configs
      that change the router at one size, whose small differences in N a fit would read as a law).
  """
  x, y = _design(n, e), np.log(np.asarray(loss, np.float64))
  if len(y) < 5:
    raise ValueError(
        f"the fit needs at least 5 (N, E, loss) points for 4 coefficients, got {len(y)}"
    )
  span = float(np.max(n) / np.min(n))
  if span < MIN_N_SPAN:
    raise ValueError(
        f"the widths N span a factor of {span:.2f} < {MIN_N_SPAN}: a law in N needs model sizes"
    )
  if np.linalg.matrix_rank(x) < 4:
    raise ValueError(
        "the points do not determine the fit: give several widths N and expert counts E"
    )
  coefficients, _, _, _ = np.linalg.lstsq(x, y, rcond=None)
  residuals = y - x @ coefficients
  dof = len(y) - 4
  variance = float(residuals @ residuals) / dof
  stderr = np.sqrt(np.diag(variance * np.linalg.inv(x.T @ x)))
  return Fit(coefficients, stderr, residuals, dof)
