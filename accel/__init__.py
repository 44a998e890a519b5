"""Speed, kept apart from the math: faster implementations that give the models', the mining's and
the evaluation's results (up to float rounding) in less time on the CPU.

Entry points (each module's docstring says why and how it is faster):
    accel.gru       `run_gru`: the packed GRU recurrence, one compiled cell pass per step
                    (gru_cell.c) and weight gradients as single products; models/rnn.py
    accel.linear    `linear`: a linear map whose backward skips rows without a gradient
    accel.l2norm    `l2norm`: SCAN's l2norm with a 4-pass hand-written backward
    accel.pairs     `sparse_backward_scores`, `paired_scores`: cross-attention scores whose
                    backward revisits only the image-caption pairs that get a gradient
    accel.topk      the compiled running top-k (mining) and rank counting (evaluation), topk.c
    accel.build     compiles the C sources on first use (cached per CPU, with a timeout)

Each entry point has an `applies(...)` test; the callers run the plain torch code beside it when
it says no. One switch turns every accelerated path off: `AOQ_NO_ACCEL=1` in the environment (or
`with accel.disabled():` in code). Without a C compiler, without AVX-512, or on another processor
the C kernels are not built or fall back to plain loops: only speed is lost. `python -m accel`
says what is compiled here and which paths run.
"""

import contextlib
import os

_switch = {"on": os.environ.get("AOQ_NO_ACCEL", "") in ("", "0")}


def enabled():
    """Whether accelerated paths may run (AOQ_NO_ACCEL unset, not inside `disabled()`)."""
    return _switch["on"]


@contextlib.contextmanager
def disabled():
    """Run the plain torch paths everywhere inside the block (tests compare the two)."""
    before, _switch["on"] = _switch["on"], False
    try:
        yield
    finally:
        _switch["on"] = before


def summary():
    """One line for a step's log: whether the accelerated paths run, and which C kernels are
    compiled (cached). It compiles nothing: a step builds only the kernels it uses, on first use."""
    if not enabled():
        return "off (AOQ_NO_ACCEL): plain torch paths"
    from accel import build, gru, topk  # here: those modules import this one

    paths = {
        "gru_cell": build.library_path(gru.CELL_SOURCE, "aoq_gru_cell"),
        "topk": build.library_path(topk.SOURCE, "aoq_topk"),
    }

    def state(path):
        if path is None:
            return "unavailable (no C compiler)"
        return "compiled" if path.exists() else "not built yet (first use builds it)"

    return "on; C kernels " + ", ".join(f"{name} {state(path)}" for name, path in paths.items())
