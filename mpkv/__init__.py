"""mpkv: a multiprocess KV-cache runtime for LLM serving and RL rollouts.

Public names only. The shared-memory core lives in ``mpkv.shm``; layouts in ``mpkv.layout``; names in
``mpkv.naming``.
"""

from mpkv.errors import (
    AttachError,
    MessageTooLarge,
    MpkvError,
    NameTaken,
    PeerDied,
    ProtocolError,
    WaitTimeout,
)

__all__ = [
    "AttachError",
    "MessageTooLarge",
    "MpkvError",
    "NameTaken",
    "PeerDied",
    "ProtocolError",
    "WaitTimeout",
]
__version__ = "0.1.0"
