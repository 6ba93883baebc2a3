"""IPython magics: `%load_ext bkg_kernel` adds `%%chat`, which sends the cell to the LLM and streams the answer."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from IPython.core.error import UsageError

from bkg_kernel.client.workbench import connect, latest


def chat_magic(line: str, cell: str) -> None:
    """`%%chat [--model ID] [--max-tokens N] [--temperature T] [--system S]`: send the cell, stream the answer."""
    p = argparse.ArgumentParser(prog="%%chat", add_help=False)
    p.add_argument("--model")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--system")
    try:
        args = p.parse_args(shlex.split(line))
    except ValueError as exc:  # shlex: an unclosed quote (`--system "you are terse`)
        raise UsageError(f"{exc} in: %%chat {line}\n{p.format_usage().strip()}") from None
    except SystemExit:  # argparse said what was wrong on stderr
        raise UsageError(p.format_usage().strip()) from None
    opts = {
        k: v
        for k, v in {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature}.items()
        if v is not None
    }
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": cell.strip()}
    ]
    (latest() or connect()).llm.chat(messages, **opts)  # the notebook's connection, as its user made it


def load_ipython_extension(ipython: Any) -> None:
    """Register the `%%chat` cell magic."""
    ipython.register_magic_function(chat_magic, magic_kind="cell", magic_name="chat")
