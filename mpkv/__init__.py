"""mpkv: a multiprocess KV-cache runtime for LLM serving and RL rollouts.

Public names only: ``Controller`` (the RL trainer's handle), ``Client`` (the engine's), ``launch`` (a whole
instance in a child process, as a context manager), and every error mpkv raises (all defined in ``mpkv.errors``).
The shared-memory core lives in ``mpkv.shm``; layouts in ``mpkv.layout``; names in ``mpkv.naming``.
"""

import warnings

# pynvml 13 is a shim over nvidia-ml-py that warns each time torch.cuda imports it; the warning is not ours to act on.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

from mpkv.client import Client  # noqa: E402
from mpkv.controller import Controller  # noqa: E402
from mpkv.errors import (  # noqa: E402
    AttachError,
    BadBlocks,
    BadName,
    BadRequest,
    BadTask,
    BadTicket,
    CommandRefused,
    InstanceNotServing,
    KVMismatch,
    LaunchError,
    LeaseError,
    LinkError,
    MemoryHeld,
    MessageTooLarge,
    ModelError,
    MpkvError,
    NameTaken,
    NixlUnavailable,
    NotOurs,
    PeerDied,
    ProtocolError,
    StaleWeights,
    StepFailed,
    TaskFailed,
    TornSlot,
    TransferFailed,
    UnsafeDir,
    WaitTimeout,
    WeightUpdateFailed,
)
from mpkv.launched import LaunchedInstance, launch  # noqa: E402
from mpkv.protocol import DecodeItem, PrefillItem, Sampling  # noqa: E402

__all__ = [
    "AttachError",
    "BadBlocks",
    "BadName",
    "BadRequest",
    "BadTask",
    "BadTicket",
    "Client",
    "CommandRefused",
    "Controller",
    "DecodeItem",
    "InstanceNotServing",
    "KVMismatch",
    "LaunchError",
    "LaunchedInstance",
    "LeaseError",
    "LinkError",
    "MemoryHeld",
    "MessageTooLarge",
    "ModelError",
    "MpkvError",
    "NameTaken",
    "NixlUnavailable",
    "NotOurs",
    "PeerDied",
    "PrefillItem",
    "ProtocolError",
    "Sampling",
    "StaleWeights",
    "StepFailed",
    "TaskFailed",
    "TornSlot",
    "TransferFailed",
    "UnsafeDir",
    "WaitTimeout",
    "WeightUpdateFailed",
    "launch",
]
__version__ = "0.1.0"
