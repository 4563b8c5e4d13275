"""``python -m snopt.cli``: the ``snopt`` command."""

import sys

from . import main

sys.exit(main())
