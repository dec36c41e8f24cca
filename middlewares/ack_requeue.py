"""``AckRequeue`` and ``Action``, the settlement policy: they live in the core.

Re-exported here, unchanged, because ``asyncworker.middlewares`` is where
users import them from (``from asyncworker.middlewares import AckRequeue, Action``).
"""

from __future__ import annotations

from .._settlement import AckRequeue as AckRequeue
from .._settlement import Action as Action

__all__ = ["AckRequeue", "Action"]
