"""The verdict's ranking: the attack named as leaking most is the one whose reconstructions are
closest (median LPIPS, then PSNR); the success rate, which saturates, only breaks ties."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd

from fedleak.report.stats import Median, Rate
from fedleak.report.tables import SettingSummary
from fedleak.report.verdict import (
    SettingVerdict,
    _floor_mark,
    _leak_key,
    _rate,
    _setting_sentence,
)


def _summary(attack: str, k: int, psnr: float, lpips: float, n: int = 192) -> SettingSummary:
    return SettingSummary(
        group="",
        defense="none",
        attack=attack,
        reference=False,
        success=Rate(k, n, 0.0, 1.0),
        psnr=Median(psnr, psnr, psnr, n, 0.95),
        lpips=Median(lpips, lpips, lpips, n, 0.95),
        lpips_mean=(lpips, 0.0, n),
        not_converged=0,
        attack_runs=6,
    )


def test_an_exact_attack_leads_a_blurry_one_with_a_higher_success_rate() -> None:
    # The demo's shape: IG is exact on most samples, LTI blurry but above the floor on more.
    exact = _summary("ig", 185, 47.61, 0.0001)
    blurry = _summary("lti", 188, 15.08, 0.146)
    floor = _summary("aux-mean", 0, 12.01, 0.478)
    attacks = tuple(sorted((blurry, exact), key=_leak_key))
    assert [s.attack for s in attacks] == ["ig", "lti"]
    setting = SettingVerdict("", "none", attacks, floor, 0.1, 0.406, (50,))
    sentence = _setting_sentence(setting, setting)
    # The sentence names the measure that ranks, since ig's success rate is the lower one.
    assert sentence.startswith(
        "Without a defense, ig leaks most (closest by median LPIPS): it reconstructed 185/192 (96%)"
    )
    # The runner-up is quoted with its medians, so the ranking is visible in the sentence.
    assert "; lti 188/192 (98%), median PSNR 15.08 dB, LPIPS 0.146." in sentence


def test_a_leader_whose_interval_overlaps_the_next_attacks_is_said_not_told_apart() -> None:
    """ "gradinversion leaks most (closest by median LPIPS)" stood beside LPIPS intervals
    [0.001, 0.471] and [0.016, 0.316], which the tables rightly did not bold (audit BW2)."""
    close = dataclasses.replace(
        _summary("gradinversion", 4, 18.0, 0.10, n=8), lpips=Median(0.10, 0.001, 0.471, 8, 0.93)
    )
    near = dataclasses.replace(
        _summary("ig", 3, 17.0, 0.12, n=8), lpips=Median(0.12, 0.016, 0.316, 8, 0.93)
    )
    far = dataclasses.replace(
        _summary("dlg", 0, 9.0, 0.6, n=8), lpips=Median(0.6, 0.55, 0.7, 8, 0.93)
    )
    floor = _summary("aux-mean", 0, 12.0, 0.5, n=8)
    setting = SettingVerdict("", "none", (close, near, far), floor, 0.1, 0.4, (1,))
    assert _setting_sentence(setting, None).startswith(
        "Without a defense, gradinversion leaks most (closest by median LPIPS, not told apart "
        "from ig: their 95% intervals overlap): it reconstructed"
    )
    apart = SettingVerdict("", "none", (close, far), floor, 0.1, 0.4, (1,))
    assert "gradinversion leaks most (closest by median LPIPS): it" in _setting_sentence(
        apart, None
    )


def test_a_leader_of_too_few_samples_is_not_told_apart_by_its_point_medians() -> None:
    """Two samples each: the medians' 'intervals' are the ranges, of 50% coverage; disjoint
    ranges were read as a lead (audit EC5)."""
    few = dataclasses.replace(
        _summary("ig", 2, 30.0, 0.05, n=2), lpips=Median(0.05, 0.04, 0.06, 2, 0.5)
    )
    other = dataclasses.replace(
        _summary("dlg", 0, 9.0, 0.6, n=2), lpips=Median(0.6, 0.55, 0.65, 2, 0.5)
    )
    floor = _summary("aux-mean", 0, 12.0, 0.7, n=2)
    setting = SettingVerdict("", "none", (few, other), floor, 0.1, 0.4, (1,))
    assert _setting_sentence(setting, None).startswith(
        "Without a defense, ig leaks most (closest by median LPIPS, not told apart from dlg: "
        "fewer than 6 samples give no 95% interval): it reconstructed"
    )
    # One rival overlapping, another of too few samples: both reasons (audit EN8).
    near = dataclasses.replace(
        _summary("lti", 2, 29.0, 0.05, n=8), lpips=Median(0.055, 0.03, 0.07, 8, 0.93)
    )
    wide = dataclasses.replace(few, lpips=Median(0.05, 0.04, 0.06, 8, 0.93))
    both = SettingVerdict("", "none", (wide, near, other), floor, 0.1, 0.4, (1,))
    assert (
        "not told apart from lti, dlg: 95% intervals overlap, or fewer than 6 samples give none)"
    ) in _setting_sentence(both, None)


def test_without_lpips_psnr_ranks_and_success_breaks_ties() -> None:
    a = _summary("a", 10, 20.0, math.nan)
    b = _summary("b", 12, 25.0, math.nan)
    c = _summary("c", 15, 25.0, math.nan)
    assert [s.attack for s in sorted((a, b, c), key=_leak_key)] == ["c", "b", "a"]


def test_an_attack_at_the_floor_is_called_so() -> None:
    # The demo under sign: LTI still reconstructs, IG is no closer than the aux-mean floor.
    lti = _summary("lti", 187, 13.96, 0.190)
    ig = _summary("ig", 0, 5.72, 0.512)
    floor = _summary("aux-mean", 0, 12.01, 0.478)
    setting = SettingVerdict("", "sign", (lti, ig), floor, 0.1, 0.702, (50,))
    sentence = _setting_sentence(setting, None)
    assert sentence.startswith(
        "Under sign, lti leaks most (closest by median LPIPS): it reconstructed 187/192 (97%)"
    )
    runner_up = "; ig 0/192 (0%), median PSNR 5.72 dB, LPIPS 0.512, no closer than the floor."
    assert runner_up in sentence
    assert "no closer than the floor" not in sentence.split("; ig")[0]


def test_an_attack_that_did_not_converge_is_no_evidence_for_the_defense() -> None:
    # The demo under sign: IG as published cannot fit a sign update (3 of 3 runs unconverged).
    lti = _summary("lti", 187, 13.96, 0.190)
    ig = dataclasses.replace(_summary("ig", 0, 5.72, 0.512), not_converged=3, attack_runs=3)
    floor = _summary("aux-mean", 0, 12.01, 0.478)
    sentence = _setting_sentence(
        SettingVerdict("", "sign", (lti, ig), floor, 0.1, 0.7, (50,)), None
    )
    assert (
        "ig 0/192 (0%), median PSNR 5.72 dB, LPIPS 0.512, no closer than the floor (ig did not "
        "converge in 3 of 3 attack runs: its budget ran out or it could not match the update, "
        "so this does not show that sign stops it)." in sentence
    )
    # Alone, it is the closest attack, at the floor: the same caveat follows it.
    alone = _setting_sentence(SettingVerdict("", "sign", (ig,), floor, 0.1, 0.7, (50,)), None)
    assert "the closest, ig, reconstructed 0/192 (0%)" in alone
    assert "so this does not show that sign stops it)" in alone
    # A converged attack at the floor carries no caveat.
    converged = _setting_sentence(
        SettingVerdict("", "sign", (lti, _summary("ig", 0, 5.72, 0.512)), floor, 0.1, 0.7, (50,)),
        None,
    )
    assert "did not converge" not in converged
    # Central DP noises only the released model: the server's view is the clients' spec's.
    for label, named in (("central-dp:1:1", None), ("sign+central-dp:1:1", "sign")):
        verdict = SettingVerdict("", label, (ig,), floor, 0.1, 0.7, (50,))
        sentence = _setting_sentence(verdict, None)
        assert "central-dp:1:1 stops it" not in sentence
        assert ("so this does not show that sign stops it" in sentence) == (named == "sign")


def test_a_leader_that_did_not_converge_may_leak_more() -> None:
    # text-quickstart: TAG's loss fell 3-5x in its 300 iterations, yet it leads.
    tag = dataclasses.replace(
        _text_summary("tag", 0.812, 0.805),
        not_converged=8,
        attack_runs=8,
        token_acc=Median(0.812, 0.75, 0.875, 8, 0.93),
    )
    lti_p = _text_summary("lti-p", 0.219, 0.211)
    floor = _text_summary("aux-frequency", 0.0, 0.031)
    setting = SettingVerdict("", "none", (tag, lti_p), floor, 0.005, 0.006, (2,))
    sentence = _setting_sentence(setting, setting)
    assert sentence.startswith(
        "Without a defense, tag leaks most (highest median token accuracy): it reconstructed a "
        "median 0.812 of the tokens"
    )
    assert (
        "(tag did not converge in 8 of 8 attack runs: its budget ran out or it could not match "
        "the update, so it may recover more with a larger budget); lti-p" in sentence
    )
    assert "does not show" not in sentence


def _text_summary(attack: str, median: float, mean: float, n: int = 8) -> SettingSummary:
    return SettingSummary(
        group="",
        defense="none",
        attack=attack,
        reference=attack == "aux-frequency",
        success=Rate(0, 0, math.nan, math.nan),
        psnr=Median(math.nan, math.nan, math.nan, 0, 0.95),
        lpips=Median(math.nan, math.nan, math.nan, 0, 0.95),
        lpips_mean=(math.nan, math.nan, 0),
        not_converged=0,
        attack_runs=2,
        token_acc=Median(median, 0.0, median, n, 0.95),
        token_acc_mean=(mean, 0.01, n),
        rougeL=Median(0.0, 0.0, 0.0, n, 0.95),
    )


def test_tied_token_medians_rank_by_the_mean() -> None:
    # An untrained model: every attack's median is 0; one recovered a token now and then.
    tag = _text_summary("tag", 0.0, 0.0)
    lti = _text_summary("lti-text", 0.0, 0.016)
    lti_p = _text_summary("lti-p", 0.0, 0.0)
    ranked = sorted((lti_p, tag, lti), key=_leak_key)
    assert [s.attack for s in ranked] == ["lti-text", "lti-p", "tag"]


def test_no_leader_is_named_when_every_attack_is_at_the_floor() -> None:
    # text-quickstart cut to a few iterations: the frequency floor recovers more than any attack.
    lti = _text_summary("lti-text", 0.0, 0.016)
    tag = _text_summary("tag", 0.0, 0.0)
    floor = _text_summary("aux-frequency", 0.125, 0.109)
    setting = SettingVerdict("", "none", (lti, tag), floor, 0.014, 0.062, (2,))
    sentence = _setting_sentence(setting, setting)
    assert "leaks most" not in sentence
    assert sentence.startswith(
        "Without a defense, no attack got closer than the aux-frequency floor (median token "
        "accuracy 0.125, ROUGE-L 0.000): the closest, lti-text (highest median token "
        "accuracy, not told apart from tag: their 95% intervals overlap), reconstructed a "
        "median 0.000 of the tokens of the private sequences (ROUGE-L 0.000); tag a median "
        "0.000 of the tokens, ROUGE-L 0.000. The global model's"
    )
    assert "no closer than the floor" not in sentence  # said once for all of them
    # One attack above the floor is named as the leader again, with the floor beside it.
    above = _text_summary("lti-p", 0.25, 0.3)
    setting = SettingVerdict("", "none", (above, lti), floor, 0.014, 0.062, (2,))
    sentence = _setting_sentence(setting, setting)
    assert sentence.startswith("Without a defense, lti-p leaks most (highest median token")
    assert "against the aux-frequency floor's median token accuracy 0.125" in sentence
    assert "lti-text a median 0.000 of the tokens" in sentence
    assert sentence.count("no closer than the floor") == 1


def test_an_attack_with_successes_is_not_called_no_closer_than_the_floor() -> None:
    """DLG on CIFAR-10 inverts some samples exactly and leaves the rest as noise, so its median
    sits at the floor; the verdict said "dlg 12/24 (50%) ... no closer than the floor"."""
    ig = _summary("ig", 9, 17.3, 0.296, n=24)
    dlg = _summary("dlg", 12, 11.0, 0.56, n=24)
    floor = _summary("aux-mean", 0, 12.5, 0.52, n=24)
    setting = SettingVerdict("", "none", (ig, dlg), floor, 0.1, 0.1, (2,))
    sentence = _setting_sentence(setting, setting)
    assert "; dlg 12/24 (50%), median PSNR 11.00 dB, LPIPS 0.560." in sentence
    assert "no closer than the floor" not in sentence
    # Led by such an attack, the setting is not one where no attack beat the floor.
    alone = SettingVerdict("", "none", (dlg,), floor, 0.1, 0.1, (2,))
    assert _setting_sentence(alone, alone).startswith("Without a defense, dlg leaks most: it ")
    # Without a success, the same medians are the floor's.
    nothing = SettingVerdict("", "none", (_summary("dlg", 0, 11.0, 0.56, n=24),), floor, 0, 0, (2,))
    assert "no attack got closer than the aux-mean floor" in _setting_sentence(nothing, nothing)


def test_runs_not_converged_say_how_many_samples_failed() -> None:
    """Per-sample inversions: one failure marks its run, so "4 of 4 attack runs" read as a
    total failure where 17 of DLG's 24 inversions had converged."""
    dlg = dataclasses.replace(
        _summary("dlg", 12, 21.0, 0.2, n=24),
        not_converged=4,
        attack_runs=4,
        samples_not_converged=7,
        samples_judged=24,
    )
    floor = _summary("aux-mean", 0, 12.5, 0.52, n=24)
    setting = SettingVerdict("", "none", (dlg,), floor, 0.1, 0.1, (2,))
    assert "(dlg did not converge in 4 of 4 attack runs, for 7 of 24 samples: its budget" in (
        _setting_sentence(setting, setting)
    )
    every = dataclasses.replace(dlg, samples_not_converged=24)
    assert "in 4 of 4 attack runs: its" in _setting_sentence(
        dataclasses.replace(setting, attacks=(every,)), setting
    )


def test_a_data_set_without_test_images_says_accuracy_was_not_measured() -> None:
    """The embedded CIFAR-10 images have no test split: the verdict read "test accuracy is –
    after round 2"."""
    ig = _summary("ig", 9, 17.3, 0.296, n=24)
    floor = _summary("aux-mean", 0, 12.5, 0.52, n=24)
    setting = SettingVerdict("", "none", (ig,), floor, math.nan, math.nan, (2,))
    sentence = _setting_sentence(setting, setting)
    assert sentence.endswith(
        ". The global model's test accuracy was not measured (no test images)."
    )
    # A text run without a test split has no test images either (audit EK3).
    tag = _text_summary("tag", 0.5, 0.5)
    text = SettingVerdict("", "none", (tag,), None, math.nan, math.nan, (2,))
    assert _setting_sentence(text, text).endswith("not measured (no test sequences).")
    # ... and a text run whose attacks left no rows (audit EP3).
    bare = SettingVerdict("", "none", (), None, math.nan, math.nan, (1,), text=True)
    assert _setting_sentence(bare, bare).endswith("not measured (no test sequences).")


def test_the_verdict_says_what_the_attacker_saw_and_knew() -> None:
    """A report under sign read "ig leaks most" without saying the server saw each sample's
    own update, or that ig ignored the defense (adaptive = false) (audit AX1)."""
    from types import SimpleNamespace

    from fedleak.config import parse_flat
    from fedleak.report.verdict import _threat_model

    def study(*flats: dict, unadapted: float | None = None) -> SimpleNamespace:
        said = {} if unadapted is None else {"unadapted": unadapted}
        rows = pd.DataFrame({"attack": ["ig"], "diagnostics": [json.dumps(said)]})
        runs = [
            SimpleNamespace(config=parse_flat(flat), leakage=rows, batchnorm=False)
            for flat in flats
        ]
        return SimpleNamespace(scored_runs=runs)

    base = {"attack.names": "aux-mean,ig,lti", "threat.share": "per-sample"}
    blind = {**base, "defense.spec": "sign", "attack.ig.adaptive": "false"}
    saw, knew = _threat_model(study(blind))
    assert saw.startswith("The server saw each sample's own update (threat.share = per-sample)")
    # One defense is named, not "the defenses" (audit CT5).
    assert knew.startswith(
        "Under sign, ig matched the updates as if undefended (attack.ig.adaptive = false)"
    )
    assert "is not shown to stop an attack that knows the defense" in knew
    assert _threat_model(study(blind, unadapted=1.0))[1] == knew
    # Under noise an adaptive ig matches the update as a blind one does (audit BL1).
    noised = {**blind, "defense.spec": "gauss:0.01", "threat.share": "batch"}
    assert _threat_model(study(noised, unadapted=0.0)) == []
    assert _threat_model(study(noised)) != []  # rows from before the attacks said so
    # A sweep of both names the defenses the sentence is about (audit BN D5).
    both = study(blind, noised, unadapted=1.0)
    both.scored_runs[1].leakage = study(noised, unadapted=0.0).scored_runs[0].leakage
    assert _threat_model(both)[1].startswith("Under sign, ig matched the updates as if")
    pruned = {**blind, "defense.spec": "prune:0.9"}
    assert _threat_model(study(blind, pruned, unadapted=1.0))[1].startswith(
        "Under the defenses, ig matched"
    )
    # Some of the defenses, and several attacks: lists that read as lists (audit CW).
    dlg = {**blind, "attack.names": "aux-mean,dlg,ig", "attack.dlg.adaptive": "false"}
    some = study({**dlg, "defense.spec": "prune:0.9"}, dlg, noised, unadapted=1.0)
    for run in some.scored_runs[:2]:
        run.leakage = pd.concat([run.leakage, run.leakage.assign(attack="dlg")])
    some.scored_runs[2].leakage = study(noised, unadapted=0.0).scored_runs[0].leakage
    assert _threat_model(some)[1].startswith("Under prune:0.9 and sign, dlg and ig matched")
    # Undefended, adaptation changes nothing; batch sharing needs no sentence.
    undefended = {**base, "attack.ig.adaptive": False, "threat.share": "batch"}
    assert _threat_model(study(undefended)) == []
    adaptive = {**base, "defense.spec": "sign"}
    mixed = _threat_model(study(adaptive, {**adaptive, "threat.share": "batch"}))
    assert mixed == [
        "In some runs the server saw each sample's own update (threat.share = per-sample), not "
        "one update per client's batch: every attack inverts one sample at a time, the "
        "attacker's easiest case."
    ]
    # BatchNorm statistics the attacks were not given, in every run or some (audit EN8).
    batch = {**base, "threat.share": "batch"}
    normed = study(batch, batch)
    normed.scored_runs[0].batchnorm = True
    assert _threat_model(normed)[0].startswith("In some runs the clients' models have BatchNorm")
    normed.scored_runs[1].batchnorm = True
    assert _threat_model(normed)[0].startswith("The clients' models have BatchNorm, whose running")


def test_models_no_update_reached_are_not_compared() -> None:
    """Every client failed in both settings: "0.100 after round 2 (round 0: 0.100), against
    0.100 without the defense" compared two models that never trained (audit ES2)."""
    floor = _summary("aux-mean", 0, 12.01, 0.478)
    ig = _summary("ig", 185, 47.61, 0.0001)
    none = SettingVerdict("", "none", (ig,), floor, 0.1, 0.1, (2,), untrained=True)
    sign = SettingVerdict("", "sign", (ig,), floor, 0.1, 0.1, (2,), untrained=True)
    sentence = _setting_sentence(sign, none)
    assert "(round 0: 0.100; no client's update reached the model)." in sentence
    assert "without the defense" not in sentence
    trained = dataclasses.replace(none, untrained=False, accuracy_final=0.4)
    assert "against 0.400 without the defense" not in _setting_sentence(sign, trained)
    # ... nor a trained setting with a baseline that never trained.
    assert "without the defense" not in _setting_sentence(
        dataclasses.replace(sign, untrained=False, accuracy_final=0.6), none
    )
    assert "against 0.400 without the defense" in _setting_sentence(
        dataclasses.replace(sign, untrained=False), trained
    )


def test_an_accuracy_over_several_seeds_says_it_is_a_mean() -> None:
    """Two seeds' runs read as one run's accuracy (audit BH6)."""
    floor = _summary("aux-mean", 0, 12.01, 0.478)
    ig = _summary("ig", 185, 47.61, 0.0001)
    alone = SettingVerdict("", "none", (ig,), floor, 0.1, 0.102, (2,))
    assert "is 0.102 after round 2 (round 0" in _setting_sentence(alone, alone)
    seeds = SettingVerdict("", "none", (ig,), floor, 0.1, 0.102, (2,), final_runs=2)
    assert "is 0.102 after round 2 (the mean of its 2 runs; round 0: 0.100)." in _setting_sentence(
        seeds, seeds
    )


def test_a_leader_behind_the_floor_in_both_medians_says_it_leaks_through_few_samples() -> None:
    """ "ig leaks most: it reconstructed 4/64 ... (median PSNR 11.11 dB, LPIPS 0.326) against
    the floor's 12.34 dB, 0.278" read as beating the floor (audit BH4)."""
    floor = _summary("class-mean", 0, 12.34, 0.278, n=64)
    ig = _summary("ig", 4, 11.11, 0.326, n=64)
    sentence = _setting_sentence(SettingVerdict("", "none", (ig,), floor, 0.1, 0.5, (2,)), None)
    assert "ig leaks most: it reconstructed 4/64 (6%)" in sentence
    assert (
        "; its typical reconstruction is no closer than the floor's, so it leaks through "
        "those 4 samples alone" in sentence
    )
    one = _summary("ig", 1, 11.11, 0.326, n=64)  # "those 1 samples" (audit ES3)
    sentence = _setting_sentence(SettingVerdict("", "none", (one,), floor, 0.1, 0.5, (2,)), None)
    assert "so it leaks through that 1 sample alone" in sentence
    ahead = _summary("ig", 40, 20.0, 0.1, n=64)
    sentence = _setting_sentence(SettingVerdict("", "none", (ahead,), floor, 0.1, 0.5, (2,)), None)
    assert "typical reconstruction" not in sentence


def test_a_text_leader_within_the_floors_interval_is_not_told_apart_from_it() -> None:
    """text-table cheap: tag 0.062 [0.000, 0.062] led against the floor's 0.000 [0.000, 0.062]
    and the verdict read as a leak the tables (which bold nothing there) do not support."""
    floor = dataclasses.replace(
        _text_summary("aux-frequency", 0.0, 0.01), token_acc=Median(0.0, 0.0, 0.062, 32, 0.95)
    )
    close = dataclasses.replace(
        _text_summary("tag", 0.062, 0.05), token_acc=Median(0.062, 0.0, 0.062, 32, 0.95)
    )
    sentence = _setting_sentence(SettingVerdict("", "none", (close,), floor, 0.0, 0.0, (2,)), None)
    assert sentence.startswith("Without a defense, tag leaks most: it reconstructed a median 0.062")
    assert (
        "; its interval [0.000, 0.062] overlaps the floor's [0.000, 0.062], so these sequences "
        "do not tell the two apart." in sentence
    )
    clear = dataclasses.replace(
        _text_summary("tag", 0.5, 0.5), token_acc=Median(0.5, 0.375, 0.625, 32, 0.95)
    )
    sentence = _setting_sentence(SettingVerdict("", "none", (clear,), floor, 0.0, 0.0, (2,)), None)
    assert "overlaps" not in sentence
    # An attack after the leader carries the same note as in the console's summary.
    both = SettingVerdict("", "none", (clear, close), floor, 0.0, 0.0, (2,))
    assert "; tag a median 0.062 of the tokens, ROUGE-L 0.000, not told apart from the floor." in (
        _setting_sentence(both, None)
    )
    assert "not told apart from the floor" not in _setting_sentence(
        SettingVerdict("", "none", (clear, clear), floor, 0.0, 0.0, (2,)), None
    )


def test_the_headline_says_below_the_floor_for_a_text_attack_under_it() -> None:
    floor = _text_summary("aux-frequency", 0.75, 0.75)
    below = _text_summary("tag", 0.375, 0.4)
    level = _text_summary("lti-p", 0.75, 0.7)
    setting = SettingVerdict("", "none", (level, below), floor, 0.0, 0.0, (1,))
    assert _floor_mark(below, setting) == " (below the floor)"
    assert _floor_mark(level, setting) == " (at the floor)"
    above = _text_summary("lti-text", 0.875, 0.8)
    assert _floor_mark(above, setting) == " (not told apart from the floor)"  # [0, 0.875]
    clear = dataclasses.replace(above, token_acc=Median(0.875, 0.8, 0.9, 8, 0.95))
    assert _floor_mark(clear, setting) == ""


def test_an_image_attack_behind_the_floor_in_every_median_is_marked_below_it() -> None:
    """ig at 5.0 dB against the floor's 12.1 dB read "(at the floor)" (audit BL)."""
    floor = _summary("aux-mean", 0, 12.1, 0.47)
    behind = _summary("ig", 0, 5.0, 0.6)
    level = _summary("dlg", 0, 11.0, 0.40)  # closer by LPIPS, lower PSNR: not behind in both
    setting = SettingVerdict("", "gauss:0.01", (level, behind), floor, 0.1, 0.1, (1,))
    assert _floor_mark(behind, setting) == " (below the floor)"
    assert _floor_mark(level, setting) == " (closer than the floor by LPIPS alone)"
    no_lpips = dataclasses.replace(behind, lpips=Median(math.nan, math.nan, math.nan, 0, 0.95))
    assert _floor_mark(no_lpips, setting) == " (below the floor)"


def test_the_choice_of_settings_names_extremes_only_where_an_attack_leaks() -> None:
    """Over settings where nothing beat its floor the verdict still named a setting where
    "attacks leak most" (audit BP2), and said "those two and the undefended ones" where the
    only undefended setting was one of the two (BP4)."""
    from fedleak.report.verdict import _choice_said

    floor = _summary("aux-mean", 0, 12.0, 0.47)
    at_floor = [
        SettingVerdict(f"batch-size={b}", d, (_summary("ig", 0, 5.0, 0.6),), floor, 0.1, 0.1, (1,))
        for b, d in ((4, "sign"), (1, "none"))
    ]
    text = _choice_said(6, at_floor, [], 2, 2, leaks=False)
    assert text.startswith("Of 6 settings, in none did an attack get closer than its floor; 2 ")
    assert "leak most" not in text
    leaking = _choice_said(6, at_floor, [], 2, 2, leaks=True)
    assert leaking.startswith(
        "Of 6 settings, attacks leak most under sign (batch-size=4) and least without a "
        "defense (batch-size=1); those two are summarised here;"
    )
    assert _choice_said(6, [], [], 4, 0, leaks=False).startswith(
        "Of 6 settings, none has a scored attack;"
    )


def test_an_attack_that_never_ran_gets_no_caveat_about_ignoring_the_defense() -> None:
    """Every cell failed before its first attack, and the verdict still said "ig matched the
    updates as if undefended" (audit BP3)."""
    from types import SimpleNamespace

    from fedleak.config import parse_flat
    from fedleak.report.verdict import _threat_model

    flat = {"attack.names": "aux-mean,ig", "defense.spec": "sign", "attack.ig.adaptive": "false"}
    empty = pd.DataFrame({"attack": pd.Series([], dtype=str), "diagnostics": []})
    failed = SimpleNamespace(config=parse_flat(flat), leakage=empty, batchnorm=False)
    assert _threat_model(SimpleNamespace(scored_runs=[failed])) == []


def test_attacks_whose_every_run_diverged_are_not_ranked_as_leaking() -> None:
    """Every run of ig and dlg diverged (a model trained to NaN): the verdict said "dlg leaks
    most (highest success rate): it reconstructed 0/64 (0%)" (audit BT D2)."""
    empty = Median(math.nan, math.nan, math.nan, 0, 0.95)
    lost = {
        attack: dataclasses.replace(
            _summary(attack, 0, 0.0, 0.0, n=64), psnr=empty, lpips=empty, diverged=2
        )
        for attack in ("dlg", "ig")
    }
    floor = _summary("aux-mean", 0, 11.5, 0.355)
    setting = SettingVerdict("", "none", (lost["dlg"], lost["ig"]), floor, 0.065, math.nan, (2,))
    sentence = _setting_sentence(setting, setting)
    assert sentence.startswith(
        "Without a defense, no attack produced a reconstruction to score (2 dlg attack runs "
        "diverged: counted as reconstructing nothing; 2 ig attack runs diverged: counted as "
        "reconstructing nothing)."
    )
    assert "leaks most" not in sentence
    # A text attack with nothing scored is not "undecided for want of LPIPS".
    text = dataclasses.replace(lost["ig"], attack="tag", success=Rate(0, 0, 0.0, 1.0))
    assert _rate(text) == "tag nothing scored"
    # One that still scored is ranked as before.
    scored = dataclasses.replace(setting, attacks=(_summary("ig", 3, 20.0, 0.1), lost["dlg"]))
    assert "ig leaks most" in _setting_sentence(scored, scored)


def test_the_closest_attack_at_the_floor_says_by_what_measure() -> None:
    """ "the closest, dlg" named the attack with the lower PSNR, closest by LPIPS alone and not
    told apart from ig there (audit CR4)."""
    floor = _summary("aux-mean", 0, 10.9, 0.55)
    dlg = dataclasses.replace(
        _summary("dlg", 0, 4.82, 0.584), lpips=Median(0.584, 0.570, 0.599, 192, 0.95)
    )
    ig = dataclasses.replace(
        _summary("ig", 0, 6.29, 0.588), lpips=Median(0.588, 0.578, 0.601, 192, 0.95)
    )
    setting = SettingVerdict("", "none", (dlg, ig), floor, 0.1, 0.1, (2,))
    assert "the closest, dlg (closest by median LPIPS, not told apart from ig: their 95% " in (
        _setting_sentence(setting, setting)
    )
    alone = SettingVerdict("", "none", (dlg,), floor, 0.1, 0.1, (2,))
    assert "the closest, dlg, reconstructed 0/192 " in _setting_sentence(alone, alone)


def test_an_accuracy_is_not_set_against_a_baseline_stopped_at_another_round() -> None:
    """Sign's model after round 3 read against the no-defense model after round 1, which a stop
    had cut short: 0.100 against 0.138 looked like the defense's cost (audit CR1)."""
    floor = _summary("aux-mean", 0, 12.0, 0.478)
    ig = _summary("ig", 185, 47.61, 0.0001)
    baseline = SettingVerdict("", "none", (ig,), floor, 0.1, 0.138, (1,))
    signed = dataclasses.replace(baseline, defense="sign", accuracy_final=0.1, final_rounds=(3,))
    assert _setting_sentence(signed, baseline).endswith(
        "is 0.100 after round 3 (round 0: 0.100), against 0.138 without the defense after round "
        "1, so the two are not compared at one round."
    )
    finished = dataclasses.replace(baseline, accuracy_final=0.103, final_rounds=(3,))
    assert _setting_sentence(signed, finished).endswith(
        "(round 0: 0.100), against 0.103 without the defense."
    )


def test_a_matching_loss_that_ran_to_infinity_is_not_blamed_on_the_budget() -> None:
    """Every target of ig and dlg diverged at a huge learning rate and their starting noise was
    scored; the verdict said "its budget ran out or it could not match the update" (audit
    CT1)."""
    from fedleak.report.tables import runaway_runs

    rows = pd.DataFrame(
        {
            "run": 0,
            "round": 1,
            "client_id": [0, 0, 1, 1],
            "attack": "ig",
            "loss_final": [math.inf, 0.5, 0.4, 0.3],
        }
    )
    assert runaway_runs(rows) == 1 and runaway_runs(rows.assign(loss_final=0.1)) == 0
    # A loss never finite is the update's, not the step's (audit CW4).
    assert runaway_runs(rows.assign(loss_start=[math.inf, 1.0, 1.0, 1.0])) == 0
    assert runaway_runs(rows.assign(loss_start=1.0)) == 1
    floor = _summary("aux-mean", 0, 12.0, 0.5)
    ig = dataclasses.replace(_summary("ig", 0, 5.2, 0.9), not_converged=2, attack_runs=2)
    runaway = dataclasses.replace(ig, runaway=2)
    setting = SettingVerdict("", "none", (runaway,), floor, 0.1, 0.1, (1,))
    sentence = _setting_sentence(setting, setting)
    assert (
        "(ig did not converge in 2 of 2 attack runs: its matching loss ran to infinity in 2 of "
        "them, typically from a learning rate too large for the update's scale, and their last "
        "finite iterate is scored)" in sentence
    )
    assert "budget" not in sentence
    partly = SettingVerdict(
        "", "sign", (dataclasses.replace(ig, runaway=1),), floor, 0.1, 0.1, (1,)
    )
    assert ", and elsewhere its budget ran out or it could not match the update, so this does " in (
        _setting_sentence(partly, setting)
    )


def test_an_attack_closer_than_the_floor_by_one_median_alone_says_so() -> None:
    """ig at LPIPS 0.393 against the floor's 0.443 (PSNR 11.15 against 11.60 dB) was said to
    get no closer than the floor, its medians quoted beside the claim (audit DN1)."""
    floor = _summary("aux-mean", 0, 11.60, 0.443)
    ig = _summary("ig", 0, 11.15, 0.393)
    setting = SettingVerdict("", "none", (ig,), floor, 0.1, 0.1, (1,))
    sentence = _setting_sentence(setting, setting)
    assert sentence.startswith(
        "Without a defense, no attack got closer than the aux-mean floor (median PSNR 11.60 dB, "
        "LPIPS 0.443) by both medians: the closest, ig, reconstructed 0/192 (0%) of the private "
        "samples (median PSNR 11.15 dB, LPIPS 0.393), closer by LPIPS alone"
    )
    assert _floor_mark(ig, setting) == " (closer than the floor by LPIPS alone)"
    sharper = _summary("ig-sharp", 0, 12.5, 0.47)
    both = SettingVerdict("", "none", (ig, sharper), floor, 0.1, 0.1, (1,))
    runner_up = "; ig-sharp 0/192 (0%), median PSNR 12.50 dB, LPIPS 0.470, closer than the floor"
    assert f"{runner_up} by PSNR alone." in _setting_sentence(both, both)
    # Behind the floor on both medians, as before.
    behind = _summary("ig", 0, 11.15, 0.50)
    assert _floor_mark(behind, SettingVerdict("", "none", (behind,), floor, 0.1, 0.1, (1,))) == (
        " (below the floor)"
    )


def test_a_rate_between_none_and_all_never_reads_as_none_or_all() -> None:
    """1/320 read "0%" and 319/320 "100%" beside their counts (audit DN2)."""
    from fedleak.report.stats import success_rate

    def text(k: int, n: int) -> str:
        return success_rate(pd.Series([True] * k + [False] * (n - k))).text()

    assert text(1, 320).startswith("<1% (1/320) [0, ")
    assert text(319, 320).startswith(">99% (319/320) [")
    assert text(199, 200).startswith(">99% (199/200)")
    assert text(0, 320).startswith("0% (0/320)") and text(320, 320).startswith("100% (320/320)")
    assert text(3, 8).startswith("38% (3/8)")
    assert _rate(_summary("ig", 1, 20.0, 0.2, n=320)) == "ig 1/320 (<1%)"


def test_closer_by_one_median_is_not_said_of_a_setting_where_another_is_closer_by_both() -> None:
    """The words "no attack got closer than the floor by both medians" stood beside dlg at
    12.50 dB and 0.420 against the floor's 11.60 dB and 0.443 (audit DP3)."""
    floor = _summary("aux-mean", 0, 11.60, 0.443)
    ig = _summary("ig", 0, 11.15, 0.393)
    dlg = _summary("dlg", 0, 12.50, 0.420)
    setting = SettingVerdict("", "none", (ig, dlg), floor, 0.1, 0.1, (1,))
    sentence = _setting_sentence(setting, setting)
    assert "by both medians" not in sentence and "no attack got closer" not in sentence
    assert sentence.startswith("Without a defense, ig leaks most (closest by median LPIPS)")


def test_a_text_run_without_rows_or_test_split_says_sequences_everywhere(
    tmp_path, monkeypatch
) -> None:
    """The verdict learns a run's data from its records, not from rows it may lack (audit
    EP3), and so does the leakage-per-round figure, whose panel said "no test images" (ER1)."""
    import matplotlib.axes

    from fedleak.config import parse_flat
    from fedleak.report.build import build_report
    from fedleak.report.rundir import RunDirectory

    said: list[str] = []
    drawn = matplotlib.axes.Axes.text

    def spy(self, x, y, s, *args, **kwargs):  # type: ignore[no-untyped-def]
        said.append(s)
        return drawn(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", spy)
    config = parse_flat({"num-server-rounds": 1, "attack.names": "none"})
    run = RunDirectory.create(tmp_path / "run", config, {"data": {"modality": "tokens"}})
    run.append_round(1, [], {"test_loss": math.nan, "test_accuracy": math.nan})
    build_report(tmp_path / "run")
    report = (tmp_path / "run" / "report.md").read_text()
    assert "not measured (no test sequences)" in report and "no test images" not in report
    assert [s for s in said if "not measured" in s] == ["not measured\n(no test sequences)"]
