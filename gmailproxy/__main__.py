"""``python -m gmailproxy``: the same as the ``gmailproxy`` command."""
from gevent import monkey
monkey.patch_all()

import sys  # noqa: E402

from gmailproxy.cli import main  # noqa: E402

sys.exit(main())
