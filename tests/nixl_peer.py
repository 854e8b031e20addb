"""A NIXL sender in a child process (spawn), driven by the test over a Pipe: the prefill side's sender code
(mpkv.pd.nixl), with headers the test chooses, so the decode side's checks can be shown refusing forgeries.

Commands: ("hello", k) opens sender k's link; ("write", k, n, header, fill[, restage]) fills the first n staging
slots with ``fill`` and writes them under ``header`` with the digest of those bytes (unless ``header`` names one),
and with ``restage``, fills them with that after the digest was taken, as if a stale write of an earlier owner of
the region had come in over them; ("close", k) says bye; ("exit",). Each answers ("ok", None) or
("refused", message).
"""

from __future__ import annotations

import dataclasses
from multiprocessing.connection import Connection
from typing import Any

from mpkv.config import CacheConfig
from mpkv.errors import MpkvError
from mpkv.pd.nixl import Endpoint, NixlLink, digest


def sender(conn: Connection, decode: str, port: int, cfg_json: str, prefix: str, first_port: int) -> None:
    cfg = CacheConfig.from_json(cfg_json)
    links: dict[int, NixlLink] = {}
    endpoints: dict[int, Endpoint] = {}
    try:
        while True:
            cmd: tuple[Any, ...] = conn.recv()
            if cmd[0] == "exit":
                break
            k = cmd[1]
            try:
                if cmd[0] == "hello":
                    if k not in endpoints:
                        own = dataclasses.replace(cfg, nixl_port=first_port + 10 * k)
                        endpoints[k] = Endpoint(f"{prefix}{k}", 0, own)
                    links[k] = NixlLink(f"nixl://127.0.0.1:{port}/{decode}", 0, cfg, endpoints[k])
                    links[k].open()
                elif cmd[0] == "write":
                    _, _, n, header, fill, *restage = cmd
                    endpoints[k].staging[:n] = fill
                    header = {"digest": digest(endpoints[k].staging[:n])} | header
                    if restage:
                        endpoints[k].staging[:n] = restage[0]
                    links[k].write_staged(n, header)
                elif cmd[0] == "close":
                    links.pop(k).close()
                conn.send(("ok", links[k].remote if k in links else None))
            except MpkvError as e:
                conn.send(("refused", str(e)))
    finally:
        for link in links.values():
            link.close()
        for ep in endpoints.values():
            ep.close()
        conn.close()
