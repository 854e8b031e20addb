"""`mpkv bench model`: a small Llama's prefill and decode through launched instances vs transformers' generate.

Work in progress: the skeleton exists so the CLI and mypy resolve the module.
"""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    print("mpkv bench model: not measured yet")
    return 1
