"""Triton launches recorded instead of run, each as the variant Triton compiles for it: a kernel compiles
once per distinct key of constexpr values, launch options, argument dtypes, the ints it specializes on
(equal to 1, divisible by 16) and the pointers' 16-byte alignment. A launch whose key no earlier launch
had compiles, for seconds, wherever it happens (in an engine: mid-serving)."""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import triton.runtime.jit as triton_jit

try:  # the interpreter's kernels (TRITON_INTERPRET=1) are not JITFunctions
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = None


def _unspecialized(kernel, option: str) -> set:
    names = getattr(kernel, option, None)
    if names is None:  # InterpretedFunction keeps jit's options in `kwargs`
        names = getattr(kernel, "kwargs", {}).get(option)
    return set(names or ())


def variant(kernel, args: tuple, kwargs: dict) -> tuple:
    """The key Triton compiles `kernel[grid](*args, **kwargs)` under (as the rules above say)."""
    parameters = inspect.signature(kernel.fn).parameters
    values = dict(zip(parameters, args), **kwargs)
    no_value = _unspecialized(kernel, "do_not_specialize")
    no_alignment = _unspecialized(kernel, "do_not_specialize_on_alignment")
    key = [kernel.fn.__name__]
    for name, value in values.items():
        if name not in parameters or "constexpr" in str(parameters[name].annotation):  # launch options, constexprs
            key.append((name, value))
        elif isinstance(value, torch.Tensor):
            key.append((name, value.dtype, None if name in no_alignment else value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or value is None:
            key.append((name, value))
        elif isinstance(value, int):
            key.append((name, None if name in no_value else (value == 1, value % 16 == 0)))
        else:
            key.append((name, type(value).__name__))
    return tuple(key)


@contextmanager
def recorded_launches():
    """Within it every Triton launch appends its `variant` to the yielded list and runs nothing (outputs
    stay as allocated)."""
    launches: list[tuple] = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append(variant(kernel, args, kwargs))

    classes = [cls for cls in (triton_jit.JITFunction, InterpretedFunction) if cls is not None]
    runs = [cls.run for cls in classes]
    for cls in classes:
        cls.run = record
    try:
        yield launches
    finally:
        for cls, run in zip(classes, runs):
            cls.run = run
