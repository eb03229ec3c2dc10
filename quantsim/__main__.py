"""``python -m quantsim ...``: the ``quantsim`` command line (:mod:`quantsim.cli`)."""
from quantsim.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
