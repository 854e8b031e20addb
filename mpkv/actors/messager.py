"""The messager: attaches to its rank's device pool like any attacher. Shipping KV to a decode instance layer
by layer is the PD issue's work; until then it takes part in the handshake and serves nothing."""

from __future__ import annotations

from mpkv.actors.runtime import Actor
from mpkv.protocol import Role


class Messager(Actor):
    role = Role.MESSAGER
