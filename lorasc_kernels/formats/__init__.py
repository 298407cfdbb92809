"""Weight formats: everything that knows how a weight is stored, in one folder.

* ``registry``: the weight dtypes and the scaled (fp8) formats, one entry each;
* ``scaled_weight``: :class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight`, the codes
  and per-row scales of a scaled weight as one object;
* ``quantize``: float weights into a scaled format (per-row absmax scales);
* ``rounding``: float32 values into a weight dtype or a scaled format (nearest, stochastic);
* ``checks``: the checks of scaled weights (their parts, their scales' values).

Nothing here imports the layers, the functional API or the backends.
"""
