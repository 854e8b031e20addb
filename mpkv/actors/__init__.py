"""One module per process role, plus the runtime they share. ``ROLE_CLASSES`` maps a Role to its actor."""

from mpkv.actors.messager import Messager
from mpkv.actors.transfer import TransferManager
from mpkv.actors.worker import Worker
from mpkv.protocol import Role

ROLE_CLASSES = {Role.WORKER: Worker, Role.TRANSFER: TransferManager, Role.MESSAGER: Messager}
