"""The ``metakv-cl`` command line.

Commands::

    metakv-cl fit      --config configs/naive.yaml [--trainer.max_epochs 2] [--ckpt_path last]
    metakv-cl validate --config configs/naive.yaml [--ckpt_path last | --ckpt_path PATH.ckpt]
    metakv-cl test     --config configs/naive.yaml [--ckpt_path last | --ckpt_path PATH.ckpt]
    metakv-cl compare  --config configs/quickstart.yaml [--ckpt_path last]
    metakv-cl kv-eval  ...   (compacted-KV-cache evaluation, metakv_cl.kv.evaluate)
    metakv-cl niah     ...   (needle-in-a-haystack, metakv_cl.kv.evaluate)
    metakv-cl ruler    ...   (RULER-style task accuracy under compaction, metakv_cl.kv.evaluate)

``fit``/``validate``/``test`` are a ``LightningCLI``: the config has ``trainer`` (Lightning
Trainer arguments, used for every fit of the stream; ``max_epochs`` = epochs per experience,
``default_root_dir`` = where the report, the stream state and the checkpoints go), ``model``
(:class:`~metakv_cl.training.module.ContinualLMModule`), ``data`` (the stream,
:class:`~metakv_cl.data.stream.TaskStream`), ``strategy`` (``class_path``/``init_args`` of any
:class:`~metakv_cl.strategies.base.ContinualStrategy`) and ``seed_everything``. ``fit`` runs
the whole stream, prints the table and writes ``report.{json,md}`` and plots;
``--ckpt_path last`` resumes an interrupted run from ``<default_root_dir>/stream_state`` and the
interrupted experience's ``last.ckpt``; it is refused when a setting that changes results
(model, data, strategy, Trainer, seed) differs from the run's, recorded in
``<default_root_dir>/settings.json``. ``validate``/``test`` score every experience of the
stream with the model of a finished run (``--ckpt_path last``) or of a Lightning checkpoint
(loaded without running code from it: tensors and plain values only).

One live ``fit``/``compare`` at a time per ``default_root_dir`` (``<default_root_dir>/.lock``).
SIGTERM or Ctrl-C stops a run with "interrupted; resume with --ckpt_path last" and exit status
143 / 130; finished experiences and the last finished epoch are kept.

``compare`` takes the same config with ``strategies:`` (a list of ``class_path``/``init_args``
and optionally ``model:``, init arguments of the model class replacing the shared ones for that
strategy) instead of ``strategy:``, plus optional ``strategy_defaults:`` (init arguments given to
every strategy that accepts them); a strategy that does not use Meta-KV runs on the plain model
unless its ``model:`` sets ``meta_kv``. Every module is built from the same seed and the
side-by-side report goes to ``default_root_dir``.

This module imports only what the chosen command needs: ``--help``, a usage error and the
``kv-eval``/``niah``/``ruler`` options load no torch; fit/validate/test/compare import
:mod:`metakv_cl.lightning_cli` (Lightning, Avalanche, the models).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

# The LightningCLI commands (metakv_cl.lightning_cli, imported only when one of them runs).
LIGHTNING_COMMANDS = ("fit", "validate", "test", "compare")

# The compacted-KV-cache commands: (parser in metakv_cl.kv.arguments, entry point in metakv_cl.kv.evaluate).
KV_COMMANDS = {"kv-eval": ("kv_eval_parser", "main"), "niah": ("niah_parser", "niah_main"),
               "ruler": ("ruler_parser", "ruler_main")}

INTERRUPTED_MESSAGE = "interrupted; resume with --ckpt_path last"

USAGE = """usage: metakv-cl COMMAND [options]

commands:
  fit        train a strategy on a whole stream (LightningCLI): metakv-cl fit --config configs/naive.yaml
  validate   score every experience with a trained model:      metakv-cl validate --config ... --ckpt_path last
  test       same as validate
  compare    run several strategies on one stream and seed:    metakv-cl compare --config configs/quickstart.yaml
  kv-eval    evaluate compacted KV caches (metakv_cl.kv.evaluate)
  niah       needle-in-a-haystack evaluation (metakv_cl.kv.evaluate)
  ruler      RULER-style task accuracy under one-shot compaction (metakv_cl.kv.evaluate)

`metakv-cl COMMAND --help` lists a command's options; `--print_config` prints the full config.
An error is one line naming what is wrong; add --debug to see its full traceback.
"""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, so no ``except Exception`` on the way stops it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_status = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@contextlib.contextmanager
def _stop_on_signals():
    """Turn SIGINT and SIGTERM into :class:`Interrupted` inside the block (main thread only).

    Inside a Lightning fit, SIGTERM reaches this handler through Lightning's own, which stops
    DDP workers and ends the fit at the next batch boundary (``SIGTERMException``, mapped to the
    same exit): the handler then leaves the stop to it, so no checkpoint is cut mid-write and
    no rank is left waiting in a collective. Processes forked inside the block (DataLoader
    workers) keep Python's default behaviour.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    owner = os.getpid()

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # what a worker would do without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if signal.getsignal(signum) is not interrupt:
            return  # called by a Trainer's handler: it ends the fit at the next batch boundary
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# jsonargparse and Lightning re-raise a component's error inside their own (a union's
# "Does not validate ...", a link's "Call to compute_fn ..."): the user needs the component's.
_FRAMEWORKS = ("jsonargparse", "pytorch_lightning", "lightning_fabric")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_PYTHON_CLASS = re.compile(r"<class '([\w.]+)'>")  # "Expected a <class 'float'>" -> "Expected a float"


def describe_error(error: BaseException) -> str:
    """One line for the user: the underlying error's message, with the config key where the parser knows it."""
    keys, class_path_problem = [], None
    while True:
        first_line = str(error).split("\n", 1)[0].strip()
        if _PARSER_KEY.search(first_line):
            keys += _PARSER_KEY.findall(first_line)
            class_path_problem = None  # a deeper key says more than a class path above it
        if first_line.startswith("Problem with given class_path"):
            class_path_problem = first_line.rstrip(":")
        cause = error.__cause__
        if cause is None or not _raised_by(error, _FRAMEWORKS):
            break
        error = cause
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    message = _PYTHON_CLASS.sub(r"\1", _PARSER_KEY.sub(r"\1", message))
    message = " ".join(message.split()) or "(no message)"
    if _raised_by(error, _FRAMEWORKS):  # the parser could not resolve a value: say which and what is known
        if class_path_problem:
            message = f"{class_path_problem}: {message}"
            if keys and keys[-1] == "strategy":
                from metakv_cl.lightning_cli import known_strategies

                message += f"; known strategies: {known_strategies()}"
    elif not isinstance(error, ValueError):
        message = f"{type(error).__name__}: {message}"
    if keys and keys[-1] not in message:
        message = f"{keys[-1]}: {message}"
    return message if len(message) <= 600 else message[:597] + "..."


def _raised_by(error: BaseException, packages: tuple[str, ...]) -> bool:
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    return frame.tb_frame.f_globals.get("__name__", "").split(".")[0] in packages


def main(argv: Sequence[str] | None = None) -> int | None:
    """Entry point of the ``metakv-cl`` console script.

    An error ends the command with one line on stderr, ``metakv-cl: error: ...``, naming what
    is wrong, and exit status 2 (an argument, config value or input file refused) or 1 (any
    other failure); ``--debug`` anywhere in the arguments shows the full traceback instead.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status of ``kv-eval``/``niah``/``ruler`` (None for the other commands). From Python,
        ``metakv_cl.lightning_cli.CompareCLI(args=[...]).run()`` returns the results and raises on errors.

    Raises:
        SystemExit: 130 / 143 after SIGINT / SIGTERM (with :data:`INTERRUPTED_MESSAGE` on
            stderr); 1 when the run folder is busy, unreadable or holds other settings.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        return _run_command(argv)
    except Exception as error:
        if debug:
            raise
        print(f"metakv-cl: error: {describe_error(error)} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2 if isinstance(error, _usage_errors()) else 1) from None


def _usage_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "an argument, config value or input file refused" (exit status 2)."""
    errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
    jsonargparse = sys.modules.get("jsonargparse")  # only a loaded parser can have raised its error
    return errors + (jsonargparse.ArgumentError,) if jsonargparse is not None else errors


def _check_config_files(arguments: list[str]) -> None:
    """Refuse a missing or malformed ``--config`` file naming it (the parser's YAML error does not).

    A value that is no file and reads as inline YAML or JSON (LightningCLI accepts config text
    in place of a path) is left to the parser.
    """
    import yaml

    from metakv_cl.files import read_text

    for index, argument in enumerate(arguments):
        if argument in ("--config", "-c") and index + 1 < len(arguments):
            path = arguments[index + 1]
        elif argument.startswith("--config="):
            path = argument.partition("=")[2]
        else:
            continue
        if any(mark in path for mark in ("\n", "{", ": ")) and not _is_file(path):
            continue
        try:
            yaml.safe_load(read_text(path, "config file"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{path}: malformed YAML{where}: {getattr(error, 'problem', None) or error}") from None


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long for the file system is config text, not a file
        return False


def _run_command(argv: list[str]) -> int | None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return None
    command, rest = argv[0], argv[1:]
    if command in KV_COMMANDS:
        from metakv_cl.kv import arguments

        # --help and a bad option answer here, before torch and the models load
        getattr(arguments, KV_COMMANDS[command][0])().parse_args(rest)
        try:
            from metakv_cl.kv import evaluate
        except ImportError as error:
            raise SystemExit(f"metakv-cl {command}: the KV-cache evaluation module is unavailable ({error})") from None
        status = getattr(evaluate, KV_COMMANDS[command][1])(rest)
        return status if isinstance(status, int) else None
    if command not in LIGHTNING_COMMANDS:
        print(f"metakv-cl: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    _check_config_files(rest)
    try:
        with _stop_on_signals():
            from metakv_cl.lightning_cli import run_command  # Lightning, Avalanche, the models: seconds

            run_command(command, rest)
    except Interrupted as interrupted:
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        raise SystemExit(interrupted.exit_status) from None
    return None


if __name__ == "__main__":
    # `python -m metakv_cl.cli` runs a copy of this module; the imported one is the one whose
    # Interrupted metakv_cl.lightning_cli raises
    from metakv_cl.cli import main as imported_main

    sys.exit(imported_main())
