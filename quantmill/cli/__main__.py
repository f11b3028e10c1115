"""``python -m quantmill.cli``: the same as the ``quantmill`` command."""
from quantmill.cli import main

raise SystemExit(main())
