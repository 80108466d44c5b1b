"""What every command shares: errors a user can fix (one `error:` line, exit code 2), the help
format, the seed and the device."""

import argparse
import os
import random
import signal
import sys
from collections.abc import Callable

from interrupts import interrupted_while_loading

import numpy as np
import torch


class UserError(Exception):
    """A problem the user can fix; the CLIs print it as one line, without a traceback."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point: user errors become one line on stderr and exit code 2, Ctrl-C
    "interrupted" and exit code 130 (interrupts.py gives the same while the imports load)."""
    if signal.getsignal(signal.SIGINT) is interrupted_while_loading:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # output piped into a reader that stopped early, such as `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # one of several training processes: everything is saved, and Python's own teardown can
        # abort in gloo's threads (SIGABRT) instead of returning this exit code
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default; a flag whose default is None says in words what
    leaving it out means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


# ---------------------------------------------------------------- reproducibility and devices


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(cuda: bool) -> torch.device:
    if not cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--cuda given but no CUDA device is available; run without --cuda to use the CPU")
    return torch.device("cuda")
