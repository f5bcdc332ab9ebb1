"""The report's opening paragraph and the console's closing lines, generated from the numbers.

Every figure is formatted exactly as in the summary and utility tables (success k/n and its
percentage, medians with the tables' decimals, accuracies with three), so a reader can find it
there. Reference baselines are quoted as the floor, never as an attack that leaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from fedleak.lines import listed
from fedleak.report.collect import RunRecord, Study
from fedleak.report.plots import setting_label
from fedleak.report.stats import FEWEST_FOR_INTERVAL, Median, Rate
from fedleak.report.tables import (
    SettingSummary,
    client_failures,
    diverged_runs,
    final_utility,
    row_diagnostics,
    setting_summaries,
)

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
    final_rounds: tuple[int, ...]  # the distinct last rounds of its runs, in order
    final_runs: int = 1  # the runs its final accuracy is the mean of
    # Runs whose model was measured at round 0 and not at their last round: its test loss
    # became non-finite (training diverged), so their accuracy is left out of the mean.
    diverged: tuple[str, ...] = ()
    diverged_from: int = 0  # the first round whose loss was not finite in any of them
    text: bool = False  # its runs' data are token sequences (said even when no attack ran)
    untrained: bool = False  # no client's update reached the model in any of its rounds

    @property
    def label(self) -> str:
        """The setting as the tables and figures name it."""
        return setting_label(self.group, self.defense)

    @property
    def leader(self) -> SettingSummary | None:
        """The attack that leaks most here (by median LPIPS, then PSNR, then success rate; text:
        median token accuracy, then its mean, then ROUGE-L)."""
        return self.attacks[0] if self.attacks else None


def _leak_key(summary: SettingSummary) -> tuple[float, float, float]:
    if summary.tokens:
        # Token accuracy is a share of L positions, so medians tie often (every attack at 0 on
        # an untrained model); the mean then says which recovered more.
        mean, _, count = summary.token_acc_mean
        rouge = summary.rougeL.value if summary.rougeL.n else -math.inf
        return (-summary.token_acc.value, -mean if count else math.inf, -rouge)
    # Closeness first: the success rate saturates (a blurry but recognisable reconstruction
    # and an exact one both count), so it only breaks ties between equally close attacks.
    lpips, psnr, rate = summary.lpips.value, summary.psnr.value, summary.success.value
    return (
        lpips if summary.lpips.n and math.isfinite(lpips) else math.inf,
        -psnr if summary.psnr.n and math.isfinite(psnr) else math.inf,
        -(rate if math.isfinite(rate) else -1.0),
    )


def _floor_key(summary: SettingSummary) -> float:
    """The strongest floor first: lowest LPIPS (highest PSNR where LPIPS was not measured), or
    highest token accuracy for text."""
    if summary.tokens:
        return -summary.token_acc.value
    return summary.lpips.value if summary.lpips.n else -summary.psnr.value


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
            floors = [s for s in here if s.reference and (s.lpips.n or s.psnr.n or s.tokens)]
            floor = min(floors, key=_floor_key) if floors else None
            start = utility[
                (utility["group"] == group)
                & (utility["defense"] == defense)
                & (utility["round"] == 0)
            ]
            lost = diverged_runs(runs, start)
            unmeasured = utility[
                utility["run"].isin(runs.index[lost])
                & (utility["round"] > 0)
                & utility["test_accuracy"].isna()
            ]
            trained = utility[utility["run"].isin(runs.index) & (utility["round"] > 0)]
            out.append(
                SettingVerdict(
                    group=group,
                    defense=defense,
                    attacks=attacks,
                    floor=floor,
                    accuracy_start=_mean(start["test_accuracy"]),
                    accuracy_final=_mean(runs["test_accuracy"]) if len(runs) else math.nan,
                    final_rounds=tuple(sorted({int(r) for r in runs["round"]})),
                    final_runs=max(1, int(runs["test_accuracy"].notna().sum())),
                    diverged=tuple(runs.index[lost]),
                    diverged_from=int(unmeasured["round"].min()) if len(unmeasured) else 0,
                    text=any(r.modality == "tokens" for r in study.runs if r.name in runs.index),
                    untrained="num_replies" in trained
                    and len(trained) > 0
                    and not trained["num_replies"].any(),
                )
            )
    return out


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def _rate(s: SettingSummary) -> str:
    if s.tokens:
        return f"{s.attack} a median {s.token_acc.value:.3f} of the tokens"
    rate = s.success
    if rate.n == 0 and _scored_nothing(s):  # a text attack whose every run diverged or failed
        return f"{s.attack} nothing scored"
    if rate.n == 0:
        return f"{s.attack} (success not decided: {s.undecided})"
    return f"{s.attack} {rate.k}/{rate.n} ({rate.percent()})"


def _rate_and_scores(s: SettingSummary) -> str:
    scores = _scores(s, rate_given=True)
    return f"{_rate(s)}, {scores}" if scores else _rate(s)


def _scores(s: SettingSummary, rate_given: bool = False) -> str:
    """The medians behind a verdict; a text attack's token accuracy is left out where its rate
    (`_rate`), which is that median, was just given."""
    parts = []
    if s.tokens and not rate_given:
        parts.append(f"median token accuracy {s.token_acc.value:.3f}")
    if s.tokens and s.rougeL.n:
        parts.append(f"ROUGE-L {s.rougeL.value:.3f}")
    if s.psnr.n:
        parts.append(f"median PSNR {s.psnr.value:.2f} dB")
    if s.lpips.n:
        net = " (VGG)" if s.lpips_net == "VGG" else ""
        parts.append(f"LPIPS{net} {s.lpips.value:.3f}")
    return ", ".join(parts)


def _at_floor(s: SettingSummary, v: SettingVerdict) -> bool:
    """The attack reconstructed no sample, and neither its median LPIPS is below the floor's
    nor its median PSNR above it (closer by one alone: `_closer_by_one`; text: its median
    token accuracy is not above the floor's): it learned nothing from the update. An attack that
    inverts some samples exactly and others not at all has its median at the floor, yet it
    leaks: its successes say so."""
    if v.floor is not None and s.tokens and v.floor.tokens:
        return s.token_acc.value <= v.floor.token_acc.value
    if v.floor is None or s.success.k > 0:
        return False
    no_closer = s.lpips.n and v.floor.lpips.n and s.lpips.value >= v.floor.lpips.value
    no_higher_psnr = s.psnr.n and v.floor.psnr.n and s.psnr.value <= v.floor.psnr.value
    return bool(no_closer or no_higher_psnr) and not _closer_by_one(s, v)


def _closer_by_both(s: SettingSummary, v: SettingVerdict) -> bool:
    """Both image medians of the attack are closer than the floor's (lower LPIPS, higher
    PSNR)."""
    floor = v.floor
    if floor is None or s.tokens or not (s.lpips.n and floor.lpips.n):
        return False
    if not (s.psnr.n and floor.psnr.n):
        return False
    return s.lpips.value < floor.lpips.value and s.psnr.value > floor.psnr.value


def _closer_by_one(s: SettingSummary, v: SettingVerdict) -> str:
    """The one image median ("LPIPS" or "PSNR") by which an attack that reconstructed no
    sample is closer than the floor while the other is not; '' otherwise. Such an attack did
    get closer by that measure: "no attack got closer" contradicted the medians quoted beside
    it (audit DN1)."""
    floor = v.floor
    if floor is None or s.tokens or s.success.k > 0:
        return ""
    if not (s.lpips.n and floor.lpips.n and s.psnr.n and floor.psnr.n):
        return ""
    closer = s.lpips.value < floor.lpips.value
    higher = s.psnr.value > floor.psnr.value
    if closer == higher:
        return ""
    return "LPIPS" if closer else "PSNR"


def _scored_nothing(s: SettingSummary) -> bool:
    """No sample of the attack was scored and none counts as reconstructed: its runs all
    diverged or failed."""
    if s.success.k > 0:
        return False
    return not s.token_acc.n if s.tokens else not (s.lpips.n or s.psnr.n)


def _typically_behind(s: SettingSummary, floor: SettingSummary) -> bool:
    """Both of the attack's image medians are at or behind the floor's (LPIPS not lower, PSNR
    not higher), though some of its samples beat the floor ("leaks most" alone would read as a
    typical reconstruction closer than the floor's)."""
    if s.tokens or not (s.lpips.n and floor.lpips.n and s.psnr.n and floor.psnr.n):
        return False
    return s.lpips.value >= floor.lpips.value and s.psnr.value <= floor.psnr.value


def _within_floor_noise(s: SettingSummary, floor: SettingSummary) -> str:
    """A text attack has no per-sequence success rule to show its lead over the floor: where
    the two medians' intervals overlap (the tables then bold nothing), say that the sequences
    do not tell them apart; '' otherwise."""
    if not (s.tokens and floor.tokens and s.token_acc.overlaps(floor.token_acc)):
        return ""
    ours, theirs = s.token_acc, floor.token_acc
    return (
        f"; its interval [{ours.low:.3f}, {ours.high:.3f}] overlaps the floor's "
        f"[{theirs.low:.3f}, {theirs.high:.3f}], so these sequences do not tell the two apart"
    )


def _floor_mark(s: SettingSummary, v: SettingVerdict) -> str:
    """' (at the floor)' for an attack that learned nothing, ' (below the floor)' for one
    whose medians are all behind the floor's (5 dB against its 12 read as "at"), and ' (not
    told apart from the floor)' for a text attack above it within the two medians'
    intervals."""
    if not _at_floor(s, v):
        if _closer_by_one(s, v):
            return f" (closer than the floor by {_closer_by_one(s, v)} alone)"
        close = v.floor is not None and _within_floor_noise(s, v.floor)
        return " (not told apart from the floor)" if close else ""
    return " (below the floor)" if _behind_floor(s, v) else " (at the floor)"


def _behind_floor(s: SettingSummary, v: SettingVerdict) -> bool:
    """Every median of the attack is strictly worse than the floor's (text: token accuracy;
    images: LPIPS and PSNR, or PSNR alone without LPIPS)."""
    floor = v.floor
    if floor is None:
        return False
    if s.tokens:
        return s.token_acc.value < floor.token_acc.value
    if not (s.psnr.n and floor.psnr.n) or s.psnr.value >= floor.psnr.value:
        return False
    return not (s.lpips.n and floor.lpips.n) or s.lpips.value > floor.lpips.value


def _unconverged(s: SettingSummary, v: SettingVerdict) -> str:
    """A note for an attack whose runs did not converge (its matching loss fell less than
    tenfold: the budget ran out or the update could not be matched), '' otherwise. Above the
    floor it says the leak may be larger; at the floor, that the defense is not shown to work."""
    if not s.not_converged:
        return ""
    why = "its budget ran out or it could not match the update"
    if s.runaway:
        # A larger budget would not help these: the step, not the budget, is the cause.
        why = (
            f"its matching loss ran to infinity in {s.runaway} of them, typically from a "
            "learning rate too large for the update's scale, and their last finite iterate is "
            "scored" + ("" if s.runaway == s.not_converged else f", and elsewhere {why}")
        )
    note = (
        f" ({s.attack} did not converge in {s.not_converged} of {s.attack_runs} attack runs"
        f"{_for_samples(s)}: {why}"
    )
    if _at_floor(s, v):
        clients = _clients_defense(v.defense)
        if clients != "none":
            note += f", so this does not show that {clients} stops it"
    elif s.runaway == s.not_converged:
        note += ", so it may recover more with a smaller learning rate"
    else:
        note += ", so it may recover more with a larger budget"
    return note + ")"


def _clients_defense(label: str) -> str:
    """The part of a defense label that acts on what the server sees: central DP
    (`central-dp:C:z`, `DefenseConfig.label`) noises only the model it releases."""
    if label.startswith("central-dp:"):
        return "none"
    return label.split("+central-dp:")[0]


def _for_samples(s: SettingSummary) -> str:
    """', for 7 of 24 samples' where a run holds inversions that converged beside one that
    did not, so the runs alone would overstate the failures; '' otherwise."""
    if 0 < s.samples_not_converged < s.samples_judged:
        return f", for {s.samples_not_converged} of {s.samples_judged} samples"
    return ""


def _left_out(s: SettingSummary) -> str:
    """Runs that failed are in no figure of the sentence, and runs that diverged count as
    reconstructing nothing: say so."""
    parts = []
    if s.left_out:
        runs = "run" if s.left_out == 1 else "runs"
        verb = "was" if s.left_out == 1 else "were"
        parts.append(f"{s.left_out} {s.attack} attack {runs} failed and {verb} not counted")
    if s.diverged:
        runs = "run" if s.diverged == 1 else "runs"
        parts.append(
            f"{s.diverged} {s.attack} attack {runs} diverged: counted as reconstructing nothing"
        )
    return f" ({'; '.join(parts)})" if parts else ""


def _ranked_by(s: SettingSummary) -> str:
    """The measure that made `s` the leader (`_leak_key`'s first)."""
    if s.tokens:
        return "highest median token accuracy"
    if s.lpips.n and math.isfinite(s.lpips.value):
        return "closest by median LPIPS"
    return "highest median PSNR" if s.psnr.n else "highest success rate"


def _ranked_measure(s: SettingSummary) -> Median | Rate:
    """The summary `_ranked_by` names, with its interval."""
    if s.tokens:
        return s.token_acc
    if s.lpips.n and math.isfinite(s.lpips.value):
        return s.lpips
    return s.psnr if s.psnr.n else s.success


def _not_told_apart(
    leader: SettingSummary, others: tuple[SettingSummary, ...]
) -> tuple[list[str], str]:
    """The other attacks the leader's measure does not tell apart from it (overlapping 95%
    intervals, or too few samples for one): the order between them is a point estimate's (or,
    on equal values, the names'), and why, in a phrase."""
    measure = _ranked_measure(leader)
    out, reasons = [], set()
    for other in others:
        theirs = _ranked_measure(other)
        if type(theirs) is type(measure) and theirs.n and not measure.told_apart(theirs):  # type: ignore[arg-type]
            out.append(other.attack)
            few = isinstance(measure, Median) and min(measure.n, theirs.n) < FEWEST_FOR_INTERVAL
            reasons.add("few" if few else "overlap")
    if reasons == {"few"}:
        return out, f"fewer than {FEWEST_FOR_INTERVAL} samples give no 95% interval"
    if reasons == {"few", "overlap"}:
        return out, f"95% intervals overlap, or fewer than {FEWEST_FOR_INTERVAL} samples give none"
    return out, "their 95% intervals overlap"


def _accuracy(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def _runner_up_floor(s: SettingSummary, v: SettingVerdict, nothing_learned: bool) -> str:
    """How an attack after the leader stands to the floor: where the leader already stands at
    it, the sentence has said so for all of them."""
    if nothing_learned or v.floor is None:
        return ""
    if _at_floor(s, v):
        return ", no closer than the floor"
    if _closer_by_one(s, v):
        return f", closer than the floor by {_closer_by_one(s, v)} alone"
    return ", not told apart from the floor" if _within_floor_noise(s, v.floor) else ""


def _setting_sentence(v: SettingVerdict, baseline: SettingVerdict | None) -> str:
    named = _setting_named(v)
    where = named[0].upper() + named[1:]
    leader = v.leader
    if leader is None:
        text = f"{where}, no attack produced a scored reconstruction"
    elif all(_scored_nothing(s) for s in v.attacks):
        # Every run diverged or failed: ranking them at 0% would name a leak that never was.
        why = "; ".join(_left_out(s).strip(" ()") for s in v.attacks if _left_out(s))
        text = f"{where}, no attack produced a reconstruction to score" + (
            f" ({why})" if why else ""
        )
    else:
        what = "sequences" if leader.tokens else "samples"
        scores = _scores(leader, rate_given=True)
        if leader.tokens or leader.success.n:
            rate = _rate(leader).removeprefix(leader.attack + " ")
            reconstructed = f"reconstructed {rate} of the private {what}"
            if scores:
                reconstructed += f" ({scores})"
        else:
            reconstructed = f"scored {scores} (success not decided: {leader.undecided})"
        floor = v.floor
        nothing_learned = _at_floor(leader, v)  # False without a floor
        # By what measure the leader leads, said wherever there are others to lead.
        ranked = f" ({_ranked_by(leader)})" if len(v.attacks) > 1 else ""
        alike, why = _not_told_apart(leader, v.attacks[1:])
        if alike:
            ranked = f" ({_ranked_by(leader)}, not told apart from {', '.join(alike)}: {why})"
        if floor is not None and nothing_learned:
            # Naming a leader would read as a leak where the update taught no attack anything.
            text = (
                f"{where}, no attack got closer than the {floor.attack} floor "
                f"({_scores(floor)}): the closest, {leader.attack}{ranked}, {reconstructed}"
                + _unconverged(leader, v)
            )
        elif (
            floor is not None
            and _closer_by_one(leader, v)
            # Closest by LPIPS alone, it may trail another that is closer by both (audit DP3).
            and not any(_closer_by_both(s, v) for s in v.attacks)
        ):
            text = (
                f"{where}, no attack got closer than the {floor.attack} floor "
                f"({_scores(floor)}) by both medians: the closest, {leader.attack}{ranked}, "
                f"{reconstructed}, closer by {_closer_by_one(leader, v)} alone"
                + _unconverged(leader, v)
            )
        else:
            text = f"{where}, {leader.attack} leaks most{ranked}: it {reconstructed}"
            if floor is not None:
                text += f" against the {floor.attack} floor's {_scores(floor)}"
                if _typically_behind(leader, floor):
                    k = leader.success.k
                    those = "that 1 sample" if k == 1 else f"those {k} samples"
                    text += (
                        f"; its typical reconstruction is no closer than the floor's, so it "
                        f"leaks through {those} alone"
                    )
                text += _within_floor_noise(leader, floor)
            text += _unconverged(leader, v)
        text += _left_out(leader)
        if len(v.attacks) > 1:
            text += "; " + "; ".join(
                _rate_and_scores(s)
                + _runner_up_floor(s, v, nothing_learned)
                + _unconverged(s, v)
                + _left_out(s)
                for s in v.attacks[1:]
            )
    if math.isnan(v.accuracy_final) and math.isnan(v.accuracy_start):
        held = "sequences" if v.text or any(s.tokens for s in v.attacks) else "images"
        return text + f". The global model's test accuracy was not measured (no test {held})."
    if math.isnan(v.accuracy_final) and v.diverged:
        return (
            text + f". The global model diverged: its test loss is not finite from round "
            f"{v.diverged_from} on "
            f"(round 0: accuracy {_accuracy(v.accuracy_start)}), so the updates attacked since "
            "it did are not those of a model that learns"
        ) + "."
    text += f". The global model's test accuracy is {_accuracy(v.accuracy_final)}"
    notes = []
    if len(v.final_rounds) > 1:
        last = ", ".join(map(str, v.final_rounds))
        notes.append(f"a mean over runs that stopped after rounds {last}")
    elif v.final_rounds and v.final_rounds[0]:
        text += f" after round {v.final_rounds[0]}"
        if v.final_runs > 1:
            notes.append(f"the mean of its {v.final_runs} runs")
    if v.diverged:
        whose = "its test loss is" if len(v.diverged) == 1 else "their test losses are"
        notes.append(
            f"{_named(list(v.diverged))} left out: {whose} not finite from round "
            f"{v.diverged_from} on (diverged)"
        )
    if math.isfinite(v.accuracy_start):
        notes.append(f"round 0: {_accuracy(v.accuracy_start)}")
    if v.untrained:  # every client failed: the accuracy is round 0's model's (audit ES2)
        notes.append("no client's update reached the model")
    if notes:
        text += f" ({'; '.join(notes)})"
    if (
        baseline is not None
        and baseline is not v
        and math.isfinite(baseline.accuracy_final)
        and not (v.untrained or baseline.untrained)
    ):
        text += f", against {_accuracy(baseline.accuracy_final)} without the defense"
        if baseline.final_rounds != v.final_rounds:
            # A stopped or shorter baseline run: its accuracy is no measure of the defense's cost.
            rounds = ", ".join(map(str, baseline.final_rounds))
            text += (
                f" after round{'s' if len(baseline.final_rounds) > 1 else ''} {rounds}, so the "
                "two are not compared at one round"
            )
    return text + "."


def verdict(study: Study) -> str:
    """One paragraph: which attack leaks most under which defense, at what accuracy."""
    settings = setting_verdicts(study)
    if not settings:
        # A run that failed before its first round says why, not only that nothing finished.
        return " ".join([*_incomplete(study), "No round has finished yet: nothing to conclude."])
    baselines = {v.group: v for v in settings if v.defense == "none"}
    chosen = settings
    intro = []
    if len(settings) > MAX_SETTINGS_NAMED:
        ranked = [v for v in settings if v.leader is not None]
        ranked.sort(key=lambda v: _leak_key(v.leader))  # type: ignore[arg-type]
        # The extremes first: with many undefended groups they must not be crowded out.
        extremes = list(dict.fromkeys([*ranked[:1], *ranked[-1:]]))
        undefended = [v for v in baselines.values() if v not in extremes]
        room = MAX_SETTINGS_NAMED - len(extremes)
        picked = {id(v) for v in [*extremes, *undefended[:room]]}
        chosen = [v for v in settings if id(v) in picked]
        leaks = any(not _at_floor(v.leader, v) for v in ranked)  # type: ignore[arg-type]
        said = _choice_said(len(settings), extremes, undefended, room, len(baselines), leaks)
        if "; those two" in said:  # a most and a least are named
            said = said.replace("; those two", _untold(ranked), 1)
        intro.append(said)
    sentences = [_setting_sentence(v, baselines.get(v.group)) for v in chosen]
    return " ".join(
        [
            *_incomplete(study),
            *_lost_clients(study),
            *_aggregate_view(study),
            *_threat_model(study),
            *intro,
            *sentences,
        ]
    )


_RANKED_BY = {"token_acc": "median token accuracy", "lpips": "median LPIPS", "psnr": "median PSNR"}


def _ranking_measure(ranked: list[SettingVerdict]) -> str:
    """The first measure of `_leak_key` the ranking's leader has (settings without it sort
    after every setting with it)."""
    first = ranked[0].leader
    assert first is not None
    return "token_acc" if first.tokens else ("lpips" if first.lpips.n else "psnr")


def _untold(ranked: list[SettingVerdict]) -> str:
    """What a 'most' and a 'least' among settings rest on (the first measure of `_leak_key`),
    and how many other settings each is not told apart from (overlapping 95% intervals, or
    too few samples for one): a most 0.006 closer in median LPIPS than three settings where
    the same attack reconstructed more read as a finding (audits EA3, EB3). A least that
    lacks the measure is said to be ranked last for it (EB4)."""
    measure = _ranking_measure(ranked)
    ties, missing = [], []
    for name, end, others in (("most", ranked[0], ranked[1:]), ("least", ranked[-1], ranked[:-1])):
        mine: Median = getattr(end.leader, measure)
        if not mine.n:
            missing.append(name)
            continue
        tied = sum(not mine.told_apart(getattr(v.leader, measure)) for v in others)
        if tied:
            ties.append(f"the {name} is not told apart from {tied} other setting{'s' * (tied > 1)}")
    told = ""
    if ties:
        told += (
            f"; {' and '.join(ties)} (overlapping 95% intervals, or fewer than "
            f"{FEWEST_FOR_INTERVAL} samples)"
        )
    if missing:
        what = _RANKED_BY[measure].removeprefix("median ")
        told += f"; the {' and the '.join(missing)} has no {what} and is ranked last"
    return f" (by the leading attack's {_RANKED_BY[measure]}{told}); those two"


def _choice_said(
    count: int,
    extremes: list[SettingVerdict],
    undefended: list[SettingVerdict],
    room: int,
    baselines: int,
    leaks: bool,
) -> str:
    """Which of `count` settings the verdict goes on to summarise: the extremes, named as
    such only where an attack beat its floor in some setting (`leaks`; a most and a least
    among settings at their floor would read as one defense leaking more than another), and
    the undefended ones there is room for."""
    which = (
        "the undefended ones"
        if len(undefended) <= room
        else f"{room} of the {baselines} undefended ones"
    )
    listed = f" and {which}" if undefended else ""
    tail = "; the summary table lists every setting."
    if not extremes:
        shown = f"; {which} are summarised here" if undefended else ""
        return f"Of {count} settings, none has a scored attack{shown}{tail}"
    if not leaks:
        summarised = len(extremes) + min(len(undefended), room)
        return (
            f"Of {count} settings, in none did an attack get closer than its floor; "
            f"{summarised} of them are summarised here{tail}"
        )
    if len(extremes) == 1:
        verb = "are" if listed else "is"
        return (
            f"Of {count} settings, the only one with a scored attack{listed} {verb} "
            f"summarised here{tail}"
        )
    most, least = (_setting_named(v) for v in extremes)
    return (
        f"Of {count} settings, attacks leak most {most} and least {least}; those two{listed} "
        f"are summarised here{tail}"
    )


def _setting_named(v: SettingVerdict) -> str:
    """'without a defense (batch-size=4)', 'under sign (batch-size=1)': as its sentence
    begins, so that a reader finds it below."""
    where = "without a defense" if v.defense == "none" else f"under {v.defense}"
    return f"{where} ({v.group})" if v.group else where


def _aggregate_view(study: Study) -> list[str]:
    """A sentence when the server saw only the round's aggregate: read as usual, its pooled
    figures would describe an ordinary client of a batch as large as the round's."""
    runs = [r for r in study.scored_runs if r.config.threat.view == "aggregate"]
    if not runs:
        return []
    where = "" if len(runs) == len(study.scored_runs) else "In the runs with that view, "
    return [
        f"{where}{'t' if where else 'T'}he server saw only each round's aggregate of the "
        "clients' updates (threat.view = aggregate, as under secure aggregation): every attack "
        "inverts one update of all the round's samples, and is scored against all of them."
    ]


_PER_SAMPLE = ("per-sample", "client")


def _adapting_changes(run: RunRecord, attack: str) -> bool:
    """Whether an attack told to ignore the defense would have matched the updates otherwise
    (noise, for one, needs no other loss): its rows say so (`unadapted`); rows written before
    they did are taken as yes, and an attack without rows (a run that failed first) ran on
    nothing to caution about."""
    mine = run.leakage.loc[run.leakage["attack"] == attack, "diagnostics"]
    said = [row_diagnostics(text).get("unadapted") for text in mine]
    return bool(said) and (None in said or any(value != 0 for value in said))


def _threat_model(study: Study) -> list[str]:
    """What the attacker saw and knew where a reader could assume less or more: each
    sample's own update; BatchNorm statistics the server received but the attacks were not
    given (audit EF1); and attacks told to ignore the defense they faced (a defense that stops
    such an attack is not shown to stop one that adapts to it)."""
    runs = study.scored_runs
    sentences = []
    alone = [r for r in runs if (r.config.threat.share, r.config.threat.view) == _PER_SAMPLE]
    if alone:
        where = "The server" if len(alone) == len(runs) else "In some runs the server"
        sentences.append(
            f"{where} saw each sample's own update (threat.share = per-sample), not one update "
            "per client's batch: every attack inverts one sample at a time, the attacker's "
            "easiest case."
        )
    unused = [
        r
        for r in runs
        if (r.config.threat.bn_stats, r.config.threat.view) == ("hidden", "client") and r.batchnorm
    ]
    if unused:
        where = "The clients'" if len(unused) == len(runs) else "In some runs the clients'"
        sentences.append(
            f"{where} models have BatchNorm, whose running statistics each client sent for "
            "averaging: its batch statistics follow from them (exactly after one local step), "
            "but the attacks were not given them (threat.bn-stats = hidden), so a server that "
            "uses them may reconstruct more."
        )
    defended = [r for r in runs if r.config.defense.spec != "none"]
    blind_in = [
        (attack, r.config.defense.label)
        for r in defended
        for attack in r.config.attack.names
        if str(r.config.attack.params.get(attack, {}).get("adaptive", "")).lower() in ("false", "0")
        and _adapting_changes(r, attack)
    ]
    if blind_in:
        blind = sorted({attack for attack, _ in blind_in})
        defenses = sorted({defense for _, defense in blind_in})
        # A sweep's other defenses (noise, which no adaptive loss matches otherwise) are not it.
        every = defenses == sorted({r.config.defense.label for r in defended})
        # One defense is named: "under the defenses" read as several where there was one.
        under = "the defenses" if every and len(defenses) > 1 else listed(defenses)
        them = "it" if len(blind) == 1 else "them"
        key = f"attack.{blind[0] if len(blind) == 1 else '<name>'}.adaptive"
        sentences.append(
            f"Under {under}, {listed(blind)} matched the updates as if undefended "
            f"({key} = false): a defense that stops {them} is not shown to stop an attack "
            "that knows the defense."
        )
    return sentences


def _lost_clients(study: Study) -> list[str]:
    """A sentence when clients failed to reply: their rounds aggregate and attack the others
    only, which a reader of the pooled figures would not otherwise know."""
    # The figures' runs only: a FAILED run aggregated and attacked nothing.
    runs = study.scored_runs
    counts = [c for c in (client_failures(run.utility) for run in runs) if c is not None]
    failed, asked = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if not failed:
        return []
    if failed == asked:  # every run failed, and is shown as recorded (audit ES2)
        return [
            f"Clients failed to reply all {asked} times they were asked: no update was "
            "aggregated or attacked (Runs and times lists them per run)."
        ]
    # Flower's central-DP wrapper releases no model from a round with a failed reply.
    central = {run.config.defense.central_clip > 0 for run in runs}
    if central == {True}:
        rounds = (
            "those rounds attack the others only and release no model (central DP does not "
            "release a round with a failed reply: the global model stays as it was)"
        )
    elif True in central:
        rounds = (
            "those rounds aggregate and attack the others only, and under central DP release "
            "no model (the global model stays as it was)"
        )
    else:
        rounds = "those rounds aggregate and attack the others only"
    return [
        f"Clients failed to reply {failed} of the {asked} times they were asked; {rounds} "
        "(Runs and times lists them per run)."
    ]


MAX_RUNS_NAMED = 3


def _named(items: list[str]) -> str:
    shown = "; ".join(items[:MAX_RUNS_NAMED])
    more = len(items) - MAX_RUNS_NAMED
    return shown + (f"; and {more} more" if more > 0 else "")


def _incomplete(study: Study) -> list[str]:
    """A sentence on the runs the figures lack or hold only in part (failed, stopped before
    their last round, cells not run yet), so a partial study does not read as a whole one."""
    if study.kind == "run":
        run = study.runs[0]
        if run.failure:
            return [f"The run failed ({run.failure}); its figures hold the rounds it recorded."]
        if run.last_round < run.config.num_server_rounds:
            return [
                f"The run stopped after round {run.last_round} of {run.config.num_server_rounds}."
            ]
        return []
    failed = [r for r in study.runs if r.failure]
    stopped = [r for r in study.runs if not r.failure and r.last_round < r.config.num_server_rounds]
    cells = (study.manifest or {}).get("cells", [])
    unlisted = study.cells_without_runs()
    lost = [cell["id"] for cell in unlisted if cell.get("status") == "done"]
    waiting = [cell["id"] for cell in unlisted if cell.get("status") != "done"]
    parts = []
    if failed:
        kept = "shown as recorded" if len(failed) == len(study.runs) else "left out of the figures"
        parts.append(
            f"{len(failed)} of {len(study.runs)} runs failed ("
            + _named([f"{r.name}: {r.failure}" for r in failed])
            + f"), {kept}"
        )
    if stopped:
        parts.append(
            f"{len(stopped)} stopped early ("
            + _named(
                [
                    f"{r.name} after round {r.last_round} of {r.config.num_server_rounds}"
                    for r in stopped
                ]
            )
            + ")"
        )
    if waiting:
        have = "has" if len(waiting) == 1 else "have"
        parts.append(f"{len(waiting)} of the {len(cells)} cells {have} not run ({_named(waiting)})")
    if lost:
        which = (
            "cell finished but its folder is"
            if len(lost) == 1
            else "cells finished but their folders are"
        )
        parts.append(
            f"{len(lost)} {which} missing from the sweep ({_named(lost)}; "
            "`fedleak sweep` runs it again)"
        )
    if not parts:
        return []
    return [f"Not every run is complete: {'; '.join(parts)}."]


def _not_converged(s: SettingSummary) -> str:
    if not s.not_converged:
        return ""
    return f" (not converged in {s.not_converged} of {s.attack_runs} runs{_for_samples(s)})"


def headline(study: Study) -> list[str]:
    """The closing console lines: per setting, each attack's success and the accuracy."""
    lines = []
    settings = setting_verdicts(study)
    for v in settings[: 2 * MAX_SETTINGS_NAMED]:
        attacks = (
            ", ".join(
                _rate(s) + _not_converged(s) + _left_out(s) + _floor_mark(s, v) for s in v.attacks
            )
            or "no scored attack"
        )
        floor = f"; floor {v.floor.attack} {_scores(v.floor)}" if v.floor else ""
        end = "diverged" if math.isnan(v.accuracy_final) and v.diverged else None
        accuracy = f"accuracy {_accuracy(v.accuracy_start)} -> {end or _accuracy(v.accuracy_final)}"
        what = "recovered" if any(s.tokens for s in v.attacks) else "reconstructed"
        lines.append(f"{v.label}: {accuracy} | {what}: {attacks}{floor}")
    if len(settings) > 2 * MAX_SETTINGS_NAMED:
        lines.append(f"... and {len(settings) - 2 * MAX_SETTINGS_NAMED} more settings")
    return lines
