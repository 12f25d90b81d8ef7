"""``python -m cpo_exp``: see :mod:`cpo_exp.cli`."""

from cpo_exp.cli import main

if __name__ == "__main__":
    main()
