"""Every architecture registers itself on import."""

from fastmlr.models import baseline, mcar  # noqa: F401
