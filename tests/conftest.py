"""Shared pytest set-up: a deterministic Hypothesis profile.

Parser properties must give the same verdict on every CI run, so examples are
derived from each test's source rather than drawn at random, and no deadline
applies (shared CI machines stall). ``HYPOTHESIS_PROFILE=default`` brings back
random exploration for local fuzzing.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
