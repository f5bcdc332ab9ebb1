"""Defenses by name, as spec parts (`prune:0.9`), and how to add your own.

A defense is registered with a parser `(args) -> step`, where `args` are the part's
colon-separated arguments (lower-cased) and the step is a frozen dataclass with

- `kind` (its name), `spec` (its canonical part, which parses back to it);
- `stage`: `release` for a transform of what leaves the client (noise, compression, ...),
  `clip` for per-sample clipping, `encode` for an input encoding;
- `rank`: its place among release steps (built-ins: DP noise 1, gauss 2, prune 3, sign 4);
- for release steps, `release(grads, generator, *, batched, dp_batch_size) -> grads`
  (`batched`: dim 0 indexes samples transformed independently; `dp_batch_size`: the samples
  a FedSGD gradient averages, 1 for per-sample updates, None for a FedAvg delta; draw
  randomness only from `generator`, so runs are reproducible).

    @register_defense("round", form="round:DECIMALS")
    @dataclass(frozen=True)
    class Round:
        decimals: int
        kind: ClassVar[str] = "round"
        stage: ClassVar[str] = "release"
        rank: ClassVar[float] = 3.5
        @classmethod
        def from_args(cls, args: list[str]) -> "Round": return cls(int(args[0]))
        ...

A package makes a defense available to every process with an entry point in group
`fedleak.defenses` (see `fedleak.registry`). Adaptive attacks replay every release step on
their guesses through the same pipeline, so a plugin defense is adapted to as far as an
attack replays the client's computation (LTI learns through any of them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedleak.lines import error_line
from fedleak.registry import Registry
from fedleak.settings import shown_value

Parser = Callable[[list[str]], Any]


@dataclass(frozen=True)
class SpecParser:
    """A defense's parser, guarded: whatever it raises becomes the one-line spec error.

    A plugin parser written like the example above (`cls(int(args[0]))`) raises IndexError on
    a part without arguments; `parse_defense_spec` turns only ValueError into its one-line
    error, so every other exception is turned into a ValueError naming the defense and its form.
    """

    parser: Parser
    name: str
    form: str

    def __call__(self, args: list[str]) -> Any:
        try:
            return self.parser(args)
        except ValueError as error:
            text = str(error).strip()
            if text and "\n" not in text:
                raise  # the parser's own one-line refusal, as the built-ins word theirs
            raise ValueError(self._problem(error)) from None
        except (Exception, SystemExit) as error:
            raise ValueError(self._problem(error)) from None

    def _problem(self, error: BaseException) -> str:
        line = next((part.strip() for part in str(error).splitlines() if part.strip()), "")
        if isinstance(error, ValueError) and line:
            return line
        problem = f"the parser of defense {self.name!r} failed ({error_line(error)})"
        # The form defaults to the bare name, which says nothing about the arguments expected.
        return problem if self.form == self.name else f"{problem}; expected the form {self.form}"


@dataclass(frozen=True)
class DefenseEntry:
    """A registered defense: its spec-part parser (guarded by `SpecParser`) and the form shown
    in errors."""

    name: str
    parse: Parser
    form: str

    def __post_init__(self) -> None:
        _check_form(self.name, self.form)
        parser = self.parse.parser if isinstance(self.parse, SpecParser) else self.parse
        object.__setattr__(self, "parse", SpecParser(parser, self.name, self.form))


_PARSER = "a defense class with from_args or a parser (args) -> step"


def _check_form(name: str, form: object) -> None:
    if not isinstance(form, str) or not form.strip() or "\n" in form:
        raise DEFENSES.refusal(
            name, f"form={shown_value(form)}: expected one line such as {name + ':ARG'!r}"
        )


def _parser_of(obj: Any) -> Parser:
    return obj.from_args if hasattr(obj, "from_args") else obj


def _adopt(name: str, obj: object) -> DefenseEntry:
    if isinstance(obj, DefenseEntry):
        return dataclasses.replace(obj, name=name)
    if not callable(obj):
        raise TypeError(f"expected {_PARSER}, got {obj!r}")
    return DefenseEntry(name, _parser_of(obj), getattr(obj, "form", name))


def _owner(entry: DefenseEntry) -> object:
    """The plugin's own parser (its module tells which plugin registered the entry)."""
    parse = entry.parse
    return parse.parser if isinstance(parse, SpecParser) else parse


def _builtins() -> None:
    import fedleak.defenses.catalog  # noqa: F401  (registers the built-in defenses)


DEFENSES: Registry[DefenseEntry] = Registry(
    "defense",
    "fedleak.defenses",
    "defense.spec",
    adopt=_adopt,
    builtins=_builtins,
    owner=_owner,
    forbidden=",+:",
    lower_case=True,
)


def register_defense(
    name: str, parse: Any = None, *, form: str | None = None, replace: bool = False
) -> Any:
    """Register a defense under `name`: a parser `(args) -> step`, or a class with a
    `from_args` class method; usable as a decorator (it returns what it decorates). Arguments
    of the wrong type are refused here, in one line naming the argument."""
    DEFENSES.check_name(name)
    if form is not None:
        _check_form(name, form)

    def add(obj: Any) -> Any:
        if not callable(_parser_of(obj)):
            raise DEFENSES.refusal(name, f"expected {_PARSER}, got {shown_value(obj)}")
        entry = DefenseEntry(name, _parser_of(obj), form or getattr(obj, "form", None) or name)
        DEFENSES.add(name, entry, replace=replace)
        return obj

    return add if parse is None else add(parse)


def allowed_forms() -> str:
    """The grammar of spec strings, built-in and registered defenses included."""
    from fedleak.defenses.grammar import ALLOWED_FORMS

    builtin = {"prune", "sign", "gauss", "dpsgd", "mixup", "instahide"}
    extra = [entry.form for name, entry in DEFENSES.items() if name not in builtin]
    if not extra:
        return ALLOWED_FORMS
    return f"{ALLOWED_FORMS}; registered: {' | '.join(extra)}"
