"""Every benchmark `kvsqueeze eval` knows, one file each, registered by name."""

from . import needle_grid  # noqa: F401
from . import passkey  # noqa: F401
from . import perplexity  # noqa: F401
from . import ruler  # noqa: F401
from . import longbench  # noqa: F401
from . import longbench_e  # noqa: F401
from . import longbench_v2  # noqa: F401
from . import infinitebench  # noqa: F401
from . import loogle  # noqa: F401
from . import zero_scrolls  # noqa: F401
from . import aime25  # noqa: F401
from . import math500  # noqa: F401
from . import ruler_qa  # noqa: F401
