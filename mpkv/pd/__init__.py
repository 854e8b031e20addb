"""Prefill/decode disaggregation: links into a decode instance's pools, the transports that move layers over
them, and the decode instance's block leases. The engine's side is in ``mpkv.client``; the messager's loop in
``mpkv.actors.messager``."""
