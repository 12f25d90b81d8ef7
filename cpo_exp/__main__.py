"""``python -m cpo_exp``: see :mod:`cpo_exp.cli`."""

from cpo_exp.cli import entry

if __name__ == "__main__":
    entry()
