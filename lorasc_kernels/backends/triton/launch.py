"""Launching an autotuned kernel without its autotuner's work at every call.

``triton.autotune``'s ``Autotuner.run`` builds, at every launch with more than one config, a
dict of the arguments, its key from them (a scan of the argument names per key name, the
``str`` of every tensor's dtype) and the config's keyword arguments: 16.5 µs of host time
per launch with the 9 Hopper configs of the tiled GEMM, against 4.2 µs through
:func:`launch` (this project's CPU, the JIT function stubbed, its own run 2.1 µs;
``docs/benchmarks.md``). :func:`launch` does that work once per autotuning key: the first
launch of a key goes through the autotuner (tuning as usual, on a GPU), later ones call the
JIT function with the config the autotuner chose for it, found by a key built from the
launch's arguments by ``operator.itemgetter`` (no Python frame per argument).

The key is the autotuner's own (the values of its ``key`` arguments and the dtypes of the
tensor arguments), with dtypes as objects, not strings. A launcher passes its tensors at the
same positions in every call (the positions are read at the kernel's first launch); a
kernel's configs are fixed once it has launched. A stand-in for a kernel (a launch counter,
the sm_90 gate's recorder) is launched as ``kernel[grid](...)`` every time, and so is a
plain JIT function.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
from triton.runtime.autotuner import Autotuner

__all__ = ["launch"]


class _Signature(NamedTuple):
    """Where a kernel's autotuning key is in its launch's arguments."""

    positional: operator.itemgetter | None  # the key arguments passed by position
    keyword: operator.itemgetter | None  # ... and by keyword
    tensors: Callable[[tuple], tuple]  # the tensor arguments, a tuple (their dtypes join the key)


_SIGNATURES: dict[Autotuner, _Signature] = {}
# (kernel, key) → the keyword arguments of the config its autotuner chose. Bounded.
_CHOSEN: dict[tuple, dict] = {}
_CHOSEN_MAX = 4096
_DTYPE = operator.attrgetter("dtype")


def _getter(items: list) -> operator.itemgetter | None:
    return operator.itemgetter(*items) if items else None


def _tuple_getter(positions: list[int]) -> Callable[[tuple], tuple]:
    """The arguments at ``positions``, always as a tuple (``itemgetter`` of one position
    returns the item itself)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return lambda args: tuple(args[i] for i in positions)


def _signature(kernel: Autotuner, args: tuple, constexprs: dict) -> _Signature:
    index = {key: kernel.arg_names.index(key) for key in kernel.keys}
    positional = [i for i in index.values() if i < len(args)]
    keyword = [key for key, i in index.items() if i >= len(args) and key in constexprs]
    tensors = [i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor)]
    return _Signature(_getter(positional), _getter(keyword), _tuple_getter(tensors))


def launch(kernel, grid, args: tuple, constexprs: dict) -> None:
    """``kernel[grid](*args, **constexprs)``, through the autotuner once per autotuning key.

    ``args`` are the kernel's runtime arguments by position, ``constexprs`` its
    ``tl.constexpr`` parameters (and compile options) by name: handed over as two objects,
    not spread into this call and gathered again (0.4 µs per launch on this project's CPU).
    """
    if not isinstance(kernel, Autotuner):  # a plain JIT function, or a stand-in
        kernel[grid](*args, **constexprs)
        return
    signature = _SIGNATURES.get(kernel)
    if signature is None:
        signature = _SIGNATURES[kernel] = _signature(kernel, args, constexprs)
    positional, keyword, tensors = signature
    key = (
        kernel,
        None if positional is None else positional(args),
        None if keyword is None else keyword(constexprs),
        tuple(map(_DTYPE, tensors(args))),
    )
    chosen = _CHOSEN.get(key)
    if chosen is not None:
        kernel.fn.run(*args, grid=grid, warmup=False, **constexprs, **chosen)
        return
    kernel[grid](*args, **constexprs)  # tunes a new key (on a GPU), sets best_config
    config = kernel.best_config
    if config.pre_hook is None:  # a hook runs at each launch: left to the autotuner
        if len(_CHOSEN) >= _CHOSEN_MAX:
            _CHOSEN.clear()
        _CHOSEN[key] = config.all_kwargs()
