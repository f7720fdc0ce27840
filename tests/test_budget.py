"""The inference budget: which faces go to the age network."""

import numpy as np
import pytest

from edge.budget import face_quality, is_good, wants_age
from edge.config import BudgetConfig
from edge.track import FaceTracker
from edge.types import AgeEstimate, Face

CFG = BudgetConfig()  # 5/s while settling, 12 samples or a safe decision, then 1/s


def sharp_frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (240, 320, 3), np.uint8)  # plenty of detail: sharp


def frontal(x=100, y=60, size=80, score=0.9) -> Face:
    return Face((x, y, x + size, y + size), score, (x + 25, y + 30), (x + 55, y + 30), (x + 40, y + 50))


def run(ages, fps=30.0, seconds=6.0, image=None, face_of=frontal, cfg=CFG, challenge=25.0):
    """A customer standing at the till; returns the times at which a face was aged."""
    image = sharp_frame() if image is None else image
    tracker = FaceTracker("till")
    aged = []
    for i in range(int(seconds * fps)):
        t = i / fps
        [track], _ = tracker.update(t, [face_of()])
        if wants_age(track, image, face_of(), t, cfg, challenge, min_samples=3):
            track.add_age(AgeEstimate(ages(len(track.ages))), t)
            aged.append(t)
    return aged, track


def test_quality_of_a_good_a_small_a_turned_and_a_blurred_face():
    image = sharp_frame()
    assert is_good(face_quality(image, frontal()), CFG)
    assert not is_good(face_quality(image, frontal(size=30)), CFG)
    assert not is_good(face_quality(image, frontal(score=0.5)), CFG)
    x, y = 100, 60
    profile = Face((x, y, x + 80, y + 80), 0.9, (x + 25, y + 30), (x + 55, y + 30), (x + 70, y + 50))
    assert face_quality(image, profile).turn == pytest.approx(1.0) and not is_good(face_quality(image, profile), CFG)
    assert not is_good(face_quality(np.full((240, 320, 3), 128, np.uint8), frontal()), CFG)  # nothing sharp
    sliver = Face((319.6, 100, 320.4, 180), 0.9, (319.8, 120), (320.0, 120))  # rounds to past the right edge
    assert face_quality(image, sliver).sharpness == 0.0 and not is_good(face_quality(image, sliver), CFG)


def test_an_adult_is_aged_back_to_back_first_then_settles_to_one_recheck_a_second():
    aged, track = run(lambda n: 40.0 + (n % 3))  # clearly over 25
    assert aged[:3] == pytest.approx([0, 1 / 30, 2 / 30])  # the first decision is as fast as every frame
    gaps = np.diff(aged[3:])
    settled_at = next(i for i, g in enumerate(gaps) if g > 0.5)
    assert all(0.19 <= g <= 0.25 for g in gaps[:settled_at])  # settling: 5 a second
    assert len(track.ages) <= 12 and all(0.99 <= g <= 1.05 for g in gaps[settled_at:])
    assert len(aged) <= 180 / 10  # six seconds at 30 fps: 180 frames, at least 10x fewer age calls


def test_a_customer_near_the_challenge_age_is_aged_every_frame_until_the_decision_is_safe():
    clear, _ = run(lambda n: 50.0 + (n % 5))
    close, _ = run(lambda n: 24.0 + (n % 5))
    assert close[:12] == pytest.approx([i / 30 for i in range(12)])  # could flip: every frame, up to 12
    assert close[12] == pytest.approx(11 / 30 + 1.0, abs=0.04)  # then one re-check a second
    assert len([t for t in clear if t < 0.4]) == 4  # clear at once: 3 back to back, then 5 a second


def test_poor_faces_give_the_first_decision_then_are_aged_only_when_nothing_better_comes():
    blurred = np.full((240, 320, 3), 128, np.uint8)
    aged, _ = run(lambda n: 40.0, image=blurred, seconds=4.0)
    # the first three as when every frame was aged, then one each 0.2 s + 1 s fallback
    assert aged == pytest.approx([0, 1 / 30, 2 / 30, 2 / 30 + 1.2, 2 / 30 + 2.4, 2 / 30 + 3.6], abs=0.04)


def test_a_disabled_budget_ages_every_frame():
    aged, _ = run(lambda n: 30.0, seconds=1.0, cfg=BudgetConfig(enabled=False))
    assert len(aged) == 30


def test_a_minor_merged_into_an_adults_track_is_their_own_age_within_a_second():
    """One track, an adult for 60 s, then a 16-year-old in it (a merge, the next customer in the last one's spot):
    fused over up to 100 ages the minor was outvoted for about 50 s, every check answered no_challenge meanwhile.
    The first age far from the track's is looked at again at once; three all far make it the minor's track."""
    from edge.policy import Policy, needs_id_check
    policy = Policy(challenge_age=25, min_samples=3)

    def ages(n: int, t: float) -> float:
        return (35.0 if t < 60 else 16.0) + (n % 5) - 2  # a model's frame-to-frame wobble

    image, tracker, aged = sharp_frame(), FaceTracker("till"), []
    minor_at = None
    for i in range(int(70 * 10)):  # 10 fps
        t = i / 10
        [track], _ = tracker.update(t, [frontal()])
        if wants_age(track, image, frontal(), t, CFG, 25.0, min_samples=3):
            track.add_age(AgeEstimate(ages(len(track.ages), t)), t)
            aged.append(t)
        if t >= 60 and minor_at is None and needs_id_check(track.estimate(), policy):
            minor_at = t
    assert minor_at is not None and minor_at - 60 <= 1.5, minor_at  # was about 50 s
    assert track.estimate().age == pytest.approx(16.0, abs=2.5) and max(track.ages) < 25  # the adult's are gone


def test_older_ages_never_drop_a_young_faces_earlier_ones():
    """The light model's ages of one man jumped 11 years older as he turned his head (the carphone clip): taken for
    another face, a 19-year-old's track would have been judged on the older ages alone, no_challenge."""
    tracker = FaceTracker("till")
    [track], _ = tracker.update(0.0, [frontal()])
    for i, age in enumerate([19.0] * 12 + [31.0] * 10):
        track.add_age(AgeEstimate(age), i / 10)
    assert len(track.ages) == 22 and track.estimate().age < 25


def test_an_adults_wobbling_ages_never_pass_for_another_face():
    """A real model's ages of one face vary frame to frame (blinks, turns): no run of them drops the earlier ones."""
    rng = np.random.default_rng(1)
    for wobble in (2.0, 4.0, 8.0):
        tracker = FaceTracker("till", max_samples=100)
        [track], _ = tracker.update(0.0, [frontal()])
        for i in range(2000):
            track.add_age(AgeEstimate(float(rng.normal(35, wobble))), i / 10)
            assert len(track.ages) == min(i + 1, 100), (wobble, i)


def test_a_far_age_has_the_next_good_face_aged_at_once_never_a_poor_one():
    """An age far from the track's had every following face aged, whatever its quality: poor faces reading
    younger then dropped a settled adult's ages (a false challenge, and three times the inference)."""
    blurred = np.full((240, 320, 3), 128, np.uint8)
    tracker = FaceTracker("till")
    [track], _ = tracker.update(0.0, [frontal()])
    for i in range(40):
        track.add_age(AgeEstimate(35.0 + (i % 3) - 1), i / 10)
    track.add_age(AgeEstimate(20.0), 4.0)  # a far age, a fallback's poor face
    poor = [t for t in np.arange(4.1, 5.0, 0.1) if wants_age(track, blurred, frontal(), t, CFG, 25.0, min_samples=3)]
    good = wants_age(track, sharp_frame(), frontal(), 4.1, CFG, 25.0, min_samples=3)
    assert poor == [] and good  # the poor faces wait for the fallback; a good one goes at once
