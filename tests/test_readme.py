"""The README's layer snippet runs as written (with its inputs defined), so the face of the
package (`from moe import MoEConfig, MoEFeedForward`) and the layer's call stay what it says."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_the_layer_snippet_runs():
  text = README.read_text()
  section = text[text.index("## The layer") :]
  snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {
      "x_BLD": jax.random.normal(jax.random.key(0), (2, 16, 512)),
      "key": jax.random.key(1),
      "ce": jnp.float32(0.0),
  }
  exec(compile(snippet, str(README), "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["y"].shape == (2, 16, 512)
  assert namespace["aux"].stats.dropped_fraction.shape == (2,)  # k = 2 choice ranks.
  assert jnp.isfinite(namespace["loss"])
