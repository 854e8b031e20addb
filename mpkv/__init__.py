"""mpkv: a multiprocess KV-cache runtime for LLM serving and RL rollouts.

Public names only: ``Controller`` (the RL trainer's handle), ``Client`` (the engine's), and the errors.
The shared-memory core lives in ``mpkv.shm``; layouts in ``mpkv.layout``; names in ``mpkv.naming``.
"""

import warnings

# pynvml 13 is a shim over nvidia-ml-py that warns each time torch.cuda imports it; the warning is not ours to act on.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

from mpkv.client import Client, InstanceNotServing, TaskFailed  # noqa: E402
from mpkv.controller import CommandRefused, Controller, StepFailed  # noqa: E402
from mpkv.errors import (  # noqa: E402
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
    "Client",
    "CommandRefused",
    "Controller",
    "InstanceNotServing",
    "MessageTooLarge",
    "MpkvError",
    "NameTaken",
    "PeerDied",
    "ProtocolError",
    "StepFailed",
    "TaskFailed",
    "WaitTimeout",
]
__version__ = "0.1.0"
