"""The report's opening paragraph and the console's closing lines, generated from the numbers.

Every figure is formatted exactly as in the summary and utility tables (success k/n and its
percentage, medians with the tables' decimals, accuracies with three), so a reader can find it
there. Reference baselines are quoted as the floor, never as an attack that leaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from fedleak.report.collect import Study
from fedleak.report.plots import setting_label
from fedleak.report.tables import SettingSummary, final_utility, setting_summaries

# A verdict names every setting up to this many; beyond, only the extremes.
MAX_SETTINGS_NAMED = 4


@dataclass(frozen=True)
class SettingVerdict:
    """One setting's attacks (most leaking first), its floor and the model's accuracy."""

    group: str
    defense: str
    attacks: tuple[SettingSummary, ...]
    floor: SettingSummary | None
    accuracy_start: float
    accuracy_final: float
    final_round: int

    @property
    def label(self) -> str:
        """The setting as the tables and figures name it."""
        return setting_label(self.group, self.defense)

    @property
    def leader(self) -> SettingSummary | None:
        """The attack that leaks most here (by median LPIPS, then PSNR, then success rate)."""
        return self.attacks[0] if self.attacks else None


def _leak_key(summary: SettingSummary) -> tuple[float, float, float]:
    # Closeness first: the success rate saturates (a blurry but recognisable reconstruction
    # and an exact one both count), so it only breaks ties between equally close attacks.
    lpips, psnr, rate = summary.lpips.value, summary.psnr.value, summary.success.value
    return (
        lpips if summary.lpips.n and math.isfinite(lpips) else math.inf,
        -psnr if summary.psnr.n and math.isfinite(psnr) else math.inf,
        -(rate if math.isfinite(rate) else -1.0),
    )


def setting_verdicts(study: Study) -> list[SettingVerdict]:
    """Per setting (group, defense) in the tables' order."""
    summaries = setting_summaries(study)
    final = final_utility(study)
    utility = study.utility()
    out = []
    for group in study.groups():
        for defense in study.defenses():
            here = [s for s in summaries if s.group == group and s.defense == defense]
            runs = final[(final["group"] == group) & (final["defense"] == defense)]
            if not here and runs.empty:
                continue
            attacks = tuple(sorted((s for s in here if not s.reference), key=_leak_key))
            floors = [s for s in here if s.reference and s.lpips.n]
            floor = min(floors, key=lambda s: s.lpips.value) if floors else None
            start = utility[
                (utility["group"] == group)
                & (utility["defense"] == defense)
                & (utility["round"] == 0)
            ]
            out.append(
                SettingVerdict(
                    group=group,
                    defense=defense,
                    attacks=attacks,
                    floor=floor,
                    accuracy_start=_mean(start["test_accuracy"]),
                    accuracy_final=_mean(runs["test_accuracy"]) if len(runs) else math.nan,
                    final_round=int(runs["round"].max()) if len(runs) else 0,
                )
            )
    return out


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def _rate(s: SettingSummary) -> str:
    rate = s.success
    if rate.n == 0:
        return f"{s.attack} (success not decidable: no floor or no LPIPS)"
    return f"{s.attack} {rate.k}/{rate.n} ({100 * rate.value:.0f}%)"


def _rate_and_scores(s: SettingSummary) -> str:
    scores = _scores(s)
    return f"{_rate(s)}, {scores}" if scores else _rate(s)


def _scores(s: SettingSummary) -> str:
    parts = []
    if s.psnr.n:
        parts.append(f"median PSNR {s.psnr.value:.2f} dB")
    if s.lpips.n:
        parts.append(f"LPIPS {s.lpips.value:.3f}")
    return ", ".join(parts)


def _at_floor(s: SettingSummary, v: SettingVerdict) -> bool:
    """The attack's median LPIPS is not below the floor's: it learned nothing from the update."""
    if v.floor is None or not (s.lpips.n and v.floor.lpips.n):
        return False
    return s.lpips.value >= v.floor.lpips.value


def _accuracy(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def _setting_sentence(v: SettingVerdict, baseline: SettingVerdict | None) -> str:
    where = "Without a defense" if v.defense == "none" else f"Under {v.defense}"
    if v.group:
        where += f" ({v.group})"
    leader = v.leader
    if leader is None:
        text = f"{where}, no attack produced a scored reconstruction"
    else:
        text = (
            f"{where}, {leader.attack} leaks most: it reconstructed "
            f"{_rate(leader).removeprefix(leader.attack + ' ')} of the private samples "
            f"({_scores(leader)})"
        )
        if v.floor is not None:
            text += f" against the {v.floor.attack} floor's {_scores(v.floor)}"
        if len(v.attacks) > 1:
            text += "; " + "; ".join(
                _rate_and_scores(s) + (", no closer than the floor" if _at_floor(s, v) else "")
                for s in v.attacks[1:]
            )
    text += f". The global model's test accuracy is {_accuracy(v.accuracy_final)}"
    if v.final_round:
        text += f" after round {v.final_round}"
    if math.isfinite(v.accuracy_start):
        text += f" (round 0: {_accuracy(v.accuracy_start)})"
    if baseline is not None and baseline is not v and math.isfinite(baseline.accuracy_final):
        text += f", against {_accuracy(baseline.accuracy_final)} without the defense"
    return text + "."


def verdict(study: Study) -> str:
    """One paragraph: which attack leaks most under which defense, at what accuracy."""
    settings = setting_verdicts(study)
    if not settings:
        return "No round has finished yet: nothing to conclude."
    baselines = {v.group: v for v in settings if v.defense == "none"}
    chosen = settings
    if len(settings) > MAX_SETTINGS_NAMED:
        ranked = [v for v in settings if v.leader is not None]
        ranked.sort(key=lambda v: _leak_key(v.leader))  # type: ignore[arg-type]
        chosen = list(dict.fromkeys([*baselines.values(), *ranked[:1], *ranked[-1:]]))[:4]
    sentences = [_setting_sentence(v, baselines.get(v.group)) for v in chosen]
    if len(chosen) < len(settings):
        sentences.insert(
            0,
            f"Of {len(settings)} settings, the undefended ones and those where attacks leak "
            "most and least are summarised here; the summary table lists every setting.",
        )
    return " ".join(sentences)


def headline(study: Study) -> list[str]:
    """The closing console lines: per setting, each attack's success and the accuracy."""
    lines = []
    settings = setting_verdicts(study)
    for v in settings[: 2 * MAX_SETTINGS_NAMED]:
        attacks = ", ".join(_rate(s) for s in v.attacks) or "no scored attack"
        floor = f"; floor {v.floor.attack} {_scores(v.floor)}" if v.floor else ""
        accuracy = f"accuracy {_accuracy(v.accuracy_start)} -> {_accuracy(v.accuracy_final)}"
        lines.append(f"{v.label}: {accuracy} | reconstructed: {attacks}{floor}")
    if len(settings) > 2 * MAX_SETTINGS_NAMED:
        lines.append(f"... and {len(settings) - 2 * MAX_SETTINGS_NAMED} more settings")
    return lines
