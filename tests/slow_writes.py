"""`python tests/slow_writes.py DELAY_S <ssft_jax.train arguments>`: the trainer's CLI with every checkpoint's
background write taking at least DELAY_S seconds (`faults.slow_write_registry`), so a test's SIGTERM or kill -9
lands inside an async write. The hook is passed to the checkpointer here, in the tests; production code reads no
test setting from the environment."""
import functools
import sys

from ssft_jax import checkpoint, faults


def with_slow_writes(delay_s: float) -> None:
    """Every Checkpointer created from now on in this process writes its JSON items slowly."""
    init = checkpoint.Checkpointer.__init__

    @functools.wraps(init)
    def slow_init(self, *args, **kwargs):
        kwargs.setdefault("handler_registry", faults.slow_write_registry(delay_s, checkpoint.ITEMS[1:]))
        init(self, *args, **kwargs)

    checkpoint.Checkpointer.__init__ = slow_init


if __name__ == "__main__":
    with_slow_writes(float(sys.argv.pop(1)))
    from ssft_jax import train
    train.cli()
