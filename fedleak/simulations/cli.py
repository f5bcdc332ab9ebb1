"""The `fedleak` command line: run studies and sweeps, build reports, list presets."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from fedleak.config import ConfigError, RunConfig, parse_flat


def _override(text: str) -> tuple[str, object]:
    """`key=value`, the value read as TOML when it parses and as a bare string otherwise."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.batch-size=4")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _config(args: argparse.Namespace) -> RunConfig:
    from fedleak.simulations.presets import load_preset

    config = load_preset(args.preset)
    overrides = dict(_override(item) for item in args.set or [])
    if args.out:
        overrides["out-dir"] = str(Path(args.out).resolve())
    return parse_flat(overrides, config)


def _run(args: argparse.Namespace) -> int:
    from fedleak.report.build import build_report
    from fedleak.simulations.launch import run_study

    config = _config(args)
    path = run_study(
        config,
        num_clients=args.num_clients,
        client_cpus=args.client_cpus,
        client_gpus=args.client_gpus,
        verbose=args.verbose,
    )
    html, _ = build_report(path)
    print(f"run directory: {path}\nsummary: {path / 'summary.md'}\nreport: {html}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedleak.report.build import build_report
    from fedleak.simulations.sweep import SweepFailed, run_sweep

    out = Path(args.out).resolve() if args.out else None
    try:
        path, status = run_sweep(Path(args.file), out_dir=out), 0
    except SweepFailed as failure:
        # The finished cells still make a report; rerunning the sweep retries the failed ones.
        print(f"fedleak: {failure}", file=sys.stderr)
        path, status = failure.sweep_dir, 1
    html, _ = build_report(path)
    print(f"sweep directory: {path}\nreport: {html}")
    return status


def _report(args: argparse.Namespace) -> int:
    from fedleak.report.build import build_report

    html, markdown = build_report(Path(args.dir))
    print(f"report: {html}\nmarkdown: {markdown}")
    return 0


def _presets(_: argparse.Namespace) -> int:
    from fedleak.simulations.presets import list_presets

    for name, description in list_presets().items():
        print(f"{name:22s} {description}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from fedleak.server.validate import setting_help

    lines = setting_help(args.attack)
    widths = [max(len(getattr(line, column)) for line in lines) for column in COLUMNS[:3]]
    widths = [min(width, 40) for width in widths]
    print("  ".join(f"{c.upper():{w}}" for c, w in zip(COLUMNS, widths, strict=False)) + "  HELP")
    for line in lines:
        cells = [f"{getattr(line, c):{w}}" for c, w in zip(COLUMNS, widths, strict=False)]
        print(("  ".join(cells) + f"  {line.doc}").rstrip())
    return 0


COLUMNS = ("key", "kind", "default")


def _check(args: argparse.Namespace) -> int:
    from fedleak.server.validate import validate_components

    config = _config(args)
    validate_components(config)
    print(config.to_toml(), end="")
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser, exposed for documentation and tests."""
    main = argparse.ArgumentParser(prog="fedleak", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)

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

    run = commands.add_parser("run", help="run one study and build its report")
    study_args(run)
    run.add_argument("--num-clients", type=int, default=10)
    run.add_argument("--client-cpus", type=float, default=1.0)
    run.add_argument("--client-gpus", type=float, default=0.0)
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check", help="validate a preset and print it resolved")
    study_args(check)
    check.set_defaults(handler=_check)

    sweep = commands.add_parser("sweep", help="run a grid of studies from a sweep file")
    sweep.add_argument("file")
    sweep.add_argument("--out", help="directory that holds the sweep (default runs/)")
    sweep.set_defaults(handler=_sweep)

    report = commands.add_parser("report", help="(re)build report.html and report.md")
    report.add_argument("dir")
    report.set_defaults(handler=_report)

    commands.add_parser("presets", help="list the shipped presets").set_defaults(handler=_presets)
    keys = commands.add_parser(
        "config-keys", help="list every setting: key, type, default and a line of help"
    )
    keys.add_argument("--attack", help="only the run settings and this attack's parameters")
    keys.set_defaults(handler=_keys)
    return main


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedleak` console command."""
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"fedleak: configuration error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
