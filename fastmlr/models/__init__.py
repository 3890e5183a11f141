"""Every architecture registers itself on import."""

from fastmlr.models import baseline, deeplift, lce, mcar, mlgcn, pgcn, srdl, ssgrl  # noqa: F401
