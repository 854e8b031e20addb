"""Every error mpkv raises. Each message reads like a diagnosis: what, who, and what to do."""

from __future__ import annotations


class MpkvError(Exception):
    """Base of every mpkv error."""


class AttachError(MpkvError):
    """A named object could not be attached: missing, foreign, wrong version or size, another user's."""


class NameTaken(MpkvError):
    """Creating an object failed: its OS name exists (a live instance, a leftover, a squatter)."""


class WaitTimeout(MpkvError, TimeoutError):
    """A bounded wait reached its deadline; the message names the peer that did not deliver."""


class PeerDied(MpkvError):
    """The process a wait depended on is dead (or detached); the message names it."""


class ProtocolError(MpkvError):
    """Peers disagree about the protocol: mismatched barrier keys, wrong record sizes, wrong roles."""


class MessageTooLarge(MpkvError, ValueError):
    """A message is larger than the ring can ever hold; nothing was written."""
