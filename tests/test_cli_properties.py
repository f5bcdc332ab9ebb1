"""A property of the command line itself: whatever the arguments, settings, preset and sweep
texts and paths, `fedleak` answers with an exit status, never a traceback, and an error is one
line; and it writes nothing outside the folder it was pointed at.

Runs through the real entry point in-process. Ray's start is replaced by a stub (an input that
passes every check then ends as a run that recorded no round), and an audit hook records every
file the process creates, opens for writing, renames or deletes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedleak.config import known_keys
from fedleak.simulations import launch
from fedleak.simulations.cli import main

EXAMPLES = int(os.environ.get("FEDLEAK_CLI_EXAMPLES", "1000"))

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {
    "os.mkdir": (0,),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.rename": (0, 1),
    "os.replace": (0, 1),
    "os.symlink": (1,),
    "os.link": (1,),
    "os.truncate": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "shutil.move": (0, 1),
}


class WriteWatch:
    """Paths the process wrote to while `active`, outside `root` (an audit hook: Python offers
    no way to remove one, so it stays installed and idle between tests)."""

    def __init__(self) -> None:
        self.active = False
        self.root = Path("/")
        self.outside: list[str] = []

    def hook(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        paths = []
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writing:
                paths.append(path)
        elif event in _PATH_EVENTS:
            paths.extend(args[i] for i in _PATH_EVENTS[event] if i < len(args))
        for path in paths:
            if isinstance(path, int) or path is None:
                continue  # a file descriptor: its opening was seen
            text = os.fsdecode(path)
            if text in ("/dev/null", "/dev/stdout", "/dev/stderr"):
                continue
            resolved = os.path.realpath(os.path.join(os.getcwd(), text))
            if os.path.commonpath([resolved, str(self.root)]) != str(self.root):
                self.outside.append(f"{event} {text}")


WATCH = WriteWatch()
sys.addaudithook(WATCH.hook)

# Values users type, near the valid ones (to reach the deep checks) and far from them.
VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["0", "1", "2", "3", "4", "-1", "10", "500", "3990", "4000", "5000"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "true",
            "false",
            "none",
            "ig",
            "aux-mean",
            "aux-mean,ig",
            "dlg,idlg",
            "lti",
            "ig,ig",
            "prune:0.9",
            "sign",
            "gauss:1e30",
            "mixup:4",
            "instahide:2:inter",
            "dpsgd:1:1",
            "folder:",
            "folder:/nonexistent",
            "mnist5k",
            "cifar10-foolbox",
            "lenet",
            "resnet20",
            "fedsgd",
            "fedavg",
            "per-sample",
            "aggregate",
            "counts",
            "idlg",
            "aux-mean",
            '"quoted"',
            "[1, 2]",
            "[[1]]",
            "{a = 1}",
            "1979-05-27",
            "x\x00y",
            "../../x",
            "/",
            "é",
            "a b",
            "1_000",
            "0x10",
            "9" * 400,
            "",
        ]
    ),
    st.text(max_size=12),
)
KEYS = st.one_of(
    st.sampled_from(known_keys()),
    st.sampled_from(
        [
            "attack.ig.tv-weight",
            "attack.ig.restarts",
            "attack.ig.labels",
            "attack.ig.init",
            "attack.dlg.history",
            "attack.lti.epochs",
            "attack.lti.hidden",
            "attack.lti.cache-dir",
            "attack.nope.x",
            "attack..x",
            "a.b.c.d",
            "",
            " ",
        ]
    ),
    st.text(max_size=10),
)
SETS = st.lists(st.tuples(KEYS, VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=5)
PATHS = st.one_of(
    st.sampled_from(
        [
            *["out", "runs/x", "../up", "..", ".", "/", "/dev/null", "a\x00b", "", "~"],
            *["~/home-run", "x" * 300, "é/ü", "existing-file", "existing-run", "p.toml", "-"],
        ]
    ),
    st.text(max_size=15),
)
NUMBERS = st.one_of(VALUES, st.sampled_from(["1", "2", "0.5", "1e400", "-0"]))
TOML_LINES = st.lists(
    st.one_of(
        st.tuples(KEYS, VALUES).map(lambda kv: f"{kv[0]} = {kv[1]}"),
        st.sampled_from(["[train]", "[data]", "[attack]", "[sweep]", "[sweep.grid]", "[base]"]),
        st.sampled_from(["seed = [1, 2]", '"train.batch-size" = [1, 500]', "parallel = 2"]),
        st.sampled_from(["[[sweep.cells]]", '"defense.spec" = "sign"', 'preset = "quickstart"']),
        st.text(max_size=20),
    ),
    max_size=8,
).map("\n".join)
FILES = st.one_of(TOML_LINES.map(str.encode), st.binary(max_size=40))


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[list[str], bytes | None]:
    """An argv and, when it names `p.toml`, that file's bytes."""
    command = draw(st.sampled_from(["run", "check", "check", "sweep", "report", "weights", "etc"]))
    text = None
    if command in ("run", "check"):
        preset = draw(st.one_of(st.sampled_from(["quickstart", "p.toml", "lti-table"]), PATHS))
        argv = [command, preset]
        for item in draw(SETS):
            argv += ["--set", item]
        if draw(st.booleans()):
            argv += ["--out", draw(PATHS)]
        for option in draw(st.lists(st.sampled_from(["--num-clients", "--client-cpus"]))):
            argv += [option, draw(st.one_of(st.sampled_from(["1", "2", "3", "10"]), NUMBERS))]
        text = draw(FILES) if preset == "p.toml" else None
    elif command == "sweep":
        argv = ["sweep", "p.toml", "--out", draw(PATHS)]
        text = ("[sweep]\nnum-clients = 2\n" + draw(TOML_LINES)).encode()
    elif command == "report":
        argv = ["report", draw(PATHS)]
    elif command == "weights":
        argv = ["weights", "--nets", draw(VALUES)]
    else:
        argv = draw(st.lists(st.one_of(PATHS, st.sampled_from(["--verbose", "--help"]))))
    return argv, text


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Path]:
    """A folder with a home, a cwd two levels down (so `..` stays inside) and a finished run."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder).resolve()
        (root / "home").mkdir()
        cwd = root / "a" / "b"
        cwd.mkdir(parents=True)
        (cwd / "existing-file").write_text("x")
        yield root


def test_the_command_line_never_crashes_nor_writes_outside_its_folder(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cwd = sandbox / "a" / "b"
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(sandbox / "home"))
    monkeypatch.setenv("FEDLEAK_DATA_DIR", str(sandbox / "data"))
    monkeypatch.setattr(launch, "simulate", lambda *_, **__: None)
    # Imports and loads the data once, before the clock starts.
    main(["check", "quickstart"])
    main(["report", str(sandbox / "nowhere")])
    capsys.readouterr()
    seen = {"count": 0}

    # Derandomised: CI sees the same 1,000 command lines every run (a landing must not depend
    # on a draw); wider random campaigns are run by hand (see the hardening issue's note).
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(command_lines())
    def check(case: tuple[list[str], bytes | None]) -> None:
        argv, text = case
        if text is not None:
            (cwd / "p.toml").write_bytes(text)
        WATCH.root, WATCH.outside, WATCH.active = sandbox, [], True
        try:
            status = main(argv)
        except SystemExit as exit_:  # --help and --version exit through argparse
            status = exit_.code
        finally:
            WATCH.active = False
        _, err = capsys.readouterr()
        seen["count"] += 1
        assert not WATCH.outside, (argv, WATCH.outside)
        if "--verbose" in argv and "Traceback" in err:  # asked for: the line still ends it
            err = err.splitlines()[-1] + "\n"
        assert "Traceback" not in err, (argv, err)
        assert "fedleak: internal error" not in err, (argv, err)
        if status:
            assert status in (1, 2), (argv, status, err)
            # The error is one line; warnings said before it (a --set with no effect) are their
            # own lines. Which runs reach the error depends on the clock (a default run folder
            # is named by the second it starts), so the rule must hold either way.
            lines = [line for line in err.splitlines() if not line.startswith("fedleak: warning:")]
            assert len(lines) == 1 and lines[0].startswith("fedleak: "), (argv, err)

    start = time.perf_counter()
    check()
    seconds = time.perf_counter() - start
    assert seen["count"] >= EXAMPLES
    print(f"{seen['count']} command lines in {seconds:.1f} s")
