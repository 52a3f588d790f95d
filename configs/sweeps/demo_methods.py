"""The four SSFT methods x seeds on the same data and steps (big_vision-style sweep file for `launch.sweep`).

    python -m launch.sweep --config configs/demo.py --sweep configs/sweeps/demo_methods.py --workdir /tmp/methods
    python -m launch.sweep --config configs/demo.py:tiny \
        --sweep configs/sweeps/demo_methods.py:seeds=1,methods=fixed+sft_mixed --fixed num_steps=2 \
        --workdir /tmp/methods --run

arg: seeds=K (seeds 0..K-1, default 2), methods=a+b+... (default all four).
"""
import itertools

from ssft_jax.config import parse_arg
from ssft_jax.losses import METHODS


def get_hyper(arg: str = ""):
    a = parse_arg(arg, seeds="2", methods="+".join(METHODS))
    methods = [m for m in a["methods"].split("+") if m]
    seeds = range(int(a["seeds"]))
    return [{"ssft.method": m, "seed": s} for m, s in itertools.product(methods, seeds)]
