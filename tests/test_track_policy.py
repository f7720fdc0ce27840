import time

import cv2
import numpy as np
import pytest

from edge.detect import iou
from edge.policy import Policy, needs_id_check
from edge.risk import ResidualTable
from edge.track import FaceTracker, PictureFaces, fuse_ages
from edge.types import AgeEstimate, Face, TrackEstimate


def test_fuse_ages_ignores_a_wild_frame():
    age, spread = fuse_ages([30, 31, 29, 30, 32, 28, 75])
    assert age == pytest.approx(30.0)
    assert 1.0 < spread < 3.0


def test_fuse_ages_of_identical_samples_has_no_spread():
    assert fuse_ages([16, 16, 16]) == (16.0, 0.0)


def test_fuse_ages_agrees_with_numpys_median_and_mean():
    """Fused in plain Python (numpy's per-call cost dominates at a track's 100 ages at most): the same figures."""
    rng = np.random.default_rng(7)
    for size in (1, 2, 3, 4, 7, 30, 99, 100):
        for _ in range(20):
            values = np.concatenate([rng.normal(30, 3, size), rng.uniform(0, 90, size // 5)]).round(rng.integers(0, 3))
            median = np.median(values)
            spread = 1.4826 * np.median(np.abs(values - median))
            expected = (values[np.abs(values - median) <= 2.5 * spread].mean() if spread else median, spread)
            assert fuse_ages(values) == pytest.approx(expected, rel=1e-12, abs=1e-12)
            assert fuse_ages(list(values)) == fuse_ages(tuple(values)) == fuse_ages(values)


def test_fuse_ages_needs_samples():
    with pytest.raises(ValueError):
        fuse_ages([])


def face(x, y, size=50):
    return Face((x, y, x + size, y + size), 0.9, (x + 15, y + 20), (x + 35, y + 20))


def test_tracker_follows_a_moving_face_and_separates_two():
    tracker = FaceTracker("till", iou_threshold=0.2, lost_after_s=1.0, first_id=1)
    for step in range(5):
        t = step * 0.1
        tracks, ended = tracker.update(t, [face(100 + 3 * step, 100), face(300, 100 - 2 * step)])
        assert ended == [] and [tr.track_id for tr in tracks] == [1, 2]
        tracks[0].add_age(AgeEstimate(30), t)
        tracks[1].add_age(AgeEstimate(50), t)
    assert [(tr.track_id, len(tr.ages), tr.frames) for tr in tracker.tracks] == [(1, 5, 5), (2, 5, 5)]
    assert tracker.tracks[0].estimate().age == 30 and tracker.tracks[1].estimate().age == 50


def test_track_ids_of_a_restarted_tracker_never_repeat_the_previous_runs():
    before = FaceTracker("till", lost_after_s=0.05)
    ids = []
    for step in range(20):  # 20 customers, one after another
        tracks, _ = before.update(step * 0.1, [face(100, 100)])
        ids.append(tracks[0].track_id)
        before.update(step * 0.1 + 0.06, [])
    assert len(set(ids)) == 20
    time.sleep(0.03)  # a restart takes seconds; ids count on from the start time in milliseconds
    after = FaceTracker("till")
    tracks, _ = after.update(0.0, [face(100, 100)])
    assert tracks[0].track_id > max(ids) and tracks[0].track_id < 2 ** 53


def test_track_ends_after_it_is_lost_and_a_return_is_a_new_customer():
    tracker = FaceTracker("till", lost_after_s=1.0, first_id=1)
    tracker.update(0.0, [face(100, 100)])
    assert tracker.update(0.9, []) == ([], [])
    _, ended = tracker.update(1.2, [])
    assert [t.track_id for t in ended] == [1] and tracker.tracks == []
    tracker.update(1.3, [face(100, 100)])
    assert [t.track_id for t in tracker.tracks] == [2]


def looks(seed, tint):
    """A stand-in for a person: a smooth random pattern in its own colours, the same in every frame."""
    rng = np.random.default_rng(seed)
    pattern = cv2.GaussianBlur(rng.integers(0, 255, (64, 64, 3), np.uint8), (0, 0), 3)
    return cv2.addWeighted(pattern, 0.6, np.full_like(pattern, tint), 0.4, 0)


def frame_with(person, box):
    image = np.full((360, 640, 3), 110, np.uint8)
    x0, y0, x1, y1 = box
    pad = (x1 - x0) * 0.5  # the crop reaches past the box
    x0, y0, x1, y1 = (int(v) for v in (x0 - pad, y0 - pad, x1 + pad, y1 + pad))
    image[y0:y1, x0:x1] = cv2.resize(person, (x1 - x0, y1 - y0))
    return image


def test_a_face_joins_the_track_it_looks_like_not_the_one_it_overlaps_most():
    """The next customer steps into the spot the last one has only just left: both tracks overlap the
    face, the last customer's more. Looks decide, not overlap (before, the first track over the
    similarity floor won, and two look-alikes merged: 3 merges in 600 composed customers, now 1)."""
    first, second = looks(1, (40, 60, 200)), looks(2, (200, 120, 40))
    at_a, at_b, between = face(100, 100, 100), face(205, 100, 100), face(150, 100, 100)
    for floor, expected in ((-10.0, 2), (None, 1)):  # -10: looks never veto a match, they only rank
        tracker = FaceTracker("till", min_similarity=floor, first_id=1)
        tracker.update(0.0, [at_a], frame_with(first, at_a.box))
        tracker.update(0.1, [at_b], frame_with(second, at_b.box))  # over a face width away: a track of its own
        assert [t.track_id for t in tracker.tracks] == [1, 2]
        assert iou(np.array(at_a.box), np.array([between.box]))[0] > iou(np.array(at_b.box), np.array([between.box]))[0]
        matched, _ = tracker.update(0.2, [between], frame_with(second, between.box))
        assert matched[0].track_id == expected  # with looks: the second person's; box overlap alone: the first's


def test_end_all_returns_open_tracks():
    tracker = FaceTracker("till")
    tracker.update(0.0, [face(0, 0), face(200, 0)])
    assert len(tracker.end_all()) == 2 and tracker.tracks == []


def estimate(age, samples):
    return TrackEstimate("till", 1, age, 0.0, samples, 0.0, 1.0, (0, 0, 1, 1), 0.9)


@pytest.mark.parametrize("age, samples, expected", [
    (16.0, 3, True), (24.9, 5, True), (25.0, 5, False), (40.0, 10, False), (16.0, 2, False)])
def test_challenge_25(age, samples, expected):
    assert needs_id_check(estimate(age, samples), Policy(challenge_age=25, min_samples=3)) is expected


def test_risk_mode_challenges_by_the_measured_chance_of_being_under_18():
    rng = np.random.default_rng(0)
    true = rng.uniform(10, 60, 20_000)
    estimated = true + rng.normal(0, 4, true.size)  # a model with a 4-year error
    table = ResidualTable.measure(estimated, true)
    # under 18 from an estimate of 22: 4 years under at 1 standard deviation -> about 16 %
    assert table.probability_under(22.0, 18) == pytest.approx(0.16, abs=0.04)
    assert table.probability_under(35.0, 18) < 0.001 and table.probability_under(14.0, 18) > 0.7
    policy = Policy(mode="risk", legal_age=18, max_risk=0.02, residuals=table)
    assert needs_id_check(estimate(24.0, 5), policy) and not needs_id_check(estimate(30.0, 5), policy)
    assert 24.0 < policy.boundary_age < 30.0  # about 18 + 2.05 x 4 years
    restored = ResidualTable.from_metadata({"tillsight.residuals": table.to_metadata()})
    assert restored.probability_under(22.0, 18) == pytest.approx(table.probability_under(22.0, 18), abs=0.01)


def test_a_face_walking_off_fast_keeps_its_track_when_it_looks_the_same():
    """At 10 fps a customer walking off moves most of a face width a frame: the boxes overlap too little
    (IoU 0.11 here), and the walk-out used to become a second customer. Looks bridge up to a face width."""
    person, stranger = looks(1, (40, 60, 200)), looks(2, (200, 120, 40))
    here, step, too_far = face(100, 100, 100), face(180, 100, 100), face(290, 100, 100)
    assert iou(np.array(here.box), np.array([step.box]))[0] < 0.2
    for who, floor, same_track in ((person, 0.23, True), (stranger, 0.23, False), (person, None, False)):
        tracker = FaceTracker("till", min_similarity=floor, first_id=1)
        tracker.update(0.0, [here], frame_with(person, here.box))
        matched, _ = tracker.update(0.1, [step], frame_with(who, step.box))
        assert (matched[0].track_id == 1) is same_track
    tracker = FaceTracker("till", first_id=1)
    tracker.update(0.0, [here], frame_with(person, here.box))
    matched, _ = tracker.update(0.1, [too_far], frame_with(person, too_far.box))
    assert matched[0].track_id == 2  # further than a face width: someone else, whatever they look like


# ---------------------------------------------------------------- faces that are pictures


def face_of(x, y, size):
    """A face whose eyes are where they are on its box, whatever its size."""
    return Face((x, y, x + size, y + size), 0.9, (x + 0.3 * size, y + 0.4 * size), (x + 0.7 * size, y + 0.4 * size))


def held_still(rng, x, y, size=60.0):
    """A face on a poster as a detector sees it under sensor noise: its box jitters by a few per cent."""
    dx, dy = rng.normal(0, 0.02 * size, 2)
    return face_of(x + dx, y + dy, size * (1 + rng.normal(0, 0.03)))


def sift_for(pictures, seconds, start, faces_at, fps=5):
    """Run `faces_at(t) -> [(face, looks)]` through `pictures` for `seconds`: (t, kept faces, recognised) a frame."""
    seen = []
    for step in range(round(seconds * fps)):
        t = start + step / fps
        shown = faces_at(t)
        image = np.full((360, 640, 3), 110, np.uint8)
        for f, person in shown:
            image = np.where(frame_with(person, f.box) != 110, frame_with(person, f.box), image)
        kept, recognised = pictures.sift([f for f, _ in shown], t, image)
        seen.append((t, kept, recognised))
    return seen


def test_a_face_that_holds_its_place_and_looks_is_a_picture_after_picture_face_s():
    poster = looks(1, (40, 60, 200))
    rng = np.random.default_rng(0)
    pictures = PictureFaces(60.0)
    seen = sift_for(pictures, 70, 0.0, lambda t: [(held_still(rng, 500, 40), poster)])
    recognised_at = [t for t, _, recognised in seen if recognised]
    assert recognised_at == [60.0]
    assert all(len(kept) == 1 for t, kept, _ in seen if t < 60) and all(kept == [] for t, kept, _ in seen if t >= 60)
    assert len(pictures.pictures) == 1
    # hidden for 8 s behind customers, then there again: still the picture; unseen for an hour: forgotten
    assert sift_for(pictures, 5, 78.0, lambda t: [(held_still(rng, 500, 40), poster)])[-1][1] == []
    pictures.sift([], 83.0 + 3601, np.zeros((360, 640, 3), np.uint8))
    assert pictures.pictures == []


def test_people_are_never_pictures_a_customer_in_front_of_one_is_still_seen():
    rng = np.random.default_rng(1)
    poster, customers = looks(1, (40, 60, 200)), [looks(10 + i, (rng.integers(255), 90, 150)) for i in range(12)]
    pictures = PictureFaces(60.0)

    def till(t):
        """The poster, and customers one after another on the same spot, 10 s each, swaying (a tenth of a face
        width is 1.5 cm: a person standing still sways more) and turning."""
        sway = 0.15 * 80 * np.sin(t * 1.7)
        customer = (face_of(250 + sway + rng.normal(0, 1), 150 + rng.normal(0, 1), 80 * (1 + rng.normal(0, 0.03))),
                    customers[int(t // 10)])
        return [(held_still(rng, 500, 40), poster), customer]
    seen = sift_for(pictures, 120, 0.0, till)
    assert [t for t, _, recognised in seen if recognised] == [60.0]  # the poster, only
    assert all(any(f.box[0] < 400 for f in kept) for _, kept, _ in seen)  # every customer, in every frame
    # customers standing stock-still on one spot, one after another: told apart by their looks
    still_customers = PictureFaces(60.0)
    seen = sift_for(still_customers, 120, 0.0, lambda t: [(held_still(rng, 250, 150, 80), customers[int(t // 10)])])
    assert not any(recognised for _, _, recognised in seen) and all(len(kept) == 1 for _, kept, _ in seen)
    # someone whose face lands on the poster's place is not the poster
    kept, _ = pictures.sift([held_still(rng, 500, 40)], 121.0, frame_with(customers[0], (500, 40, 560, 100)))
    assert len(kept) == 1


@pytest.mark.parametrize("sway", [0.15, 0.5])
def test_a_customer_who_stays_long_and_moves_is_never_a_picture(sway):
    """One customer at the till for 90 s, swaying and stepping about: they pass back through where they were
    first seen again and again (before: taken for a picture at 60 s, their track dropped, a check answered as if
    nobody were there). Two copies of one poster side by side are both pictures all the same."""
    rng = np.random.default_rng(3)
    customer, poster = looks(20, (150, 90, 60)), looks(1, (40, 60, 200))
    pictures = PictureFaces(60.0)

    def till(t):
        x = 150 + sway * 80 * np.sin(t * 1.3) + rng.normal(0, 1)
        return [(face_of(x, 200 + rng.normal(0, 1), 80 * (1 + rng.normal(0, 0.03))), customer),
                (held_still(rng, 380, 60), poster), (held_still(rng, 520, 60), poster)]
    seen = sift_for(pictures, 90, 0.0, till)
    assert all(any(f.box[1] > 150 for f in kept) for _, kept, _ in seen)  # the customer, in every frame
    assert len(pictures.pictures) == 2 and all(p.box[1] < 150 for p in pictures.pictures)


def test_a_still_face_hidden_for_longer_starts_over_and_picture_face_s_0_is_off():
    poster = looks(1, (40, 60, 200))
    rng = np.random.default_rng(2)
    pictures = PictureFaces(20.0)
    sift_for(pictures, 15, 0.0, lambda t: [(held_still(rng, 500, 40), poster)])
    seen = sift_for(pictures, 25, 27.0, lambda t: [(held_still(rng, 500, 40), poster)])  # unseen 12 s
    assert [t for t, _, recognised in seen if recognised] == [47.0]
    off = PictureFaces(0.0)
    assert all(len(kept) == 1 for _, kept, _ in sift_for(off, 30, 0.0, lambda t: [(held_still(rng, 500, 40), poster)]))


def test_the_track_of_a_face_taken_for_a_picture_is_dropped_unfinished():
    tracker = FaceTracker("till", first_id=1)
    tracker.update(0.0, [face(500, 40, 60), face(250, 150, 80)])
    dropped = tracker.discard_at((501.0, 41.0, 560.0, 100.0))
    assert [t.track_id for t in dropped] == [1] and [t.track_id for t in tracker.tracks] == [2]


def test_a_tracks_ages_are_fused_again_only_when_they_change(monkeypatch):
    """A track is judged and shown at every frame and gets new ages at a few: fusing them every frame took a sixth
    of a camera thread's Python time."""
    import edge.track
    from edge.track import Track
    fused = []
    real = edge.track.fuse_ages
    monkeypatch.setattr(edge.track, "fuse_ages", lambda ages: fused.append(len(ages)) or real(ages))
    track = Track("c", 1, (0, 0, 50, 50), 0.9, 0.0, 0.0)
    for age in (30, 31, 29):
        track.add_age(AgeEstimate(age), 0.0)
    first = track.estimate()
    assert [track.estimate().age for _ in range(5)] == [first.age] * 5 and fused == [3]
    track.add_age(AgeEstimate(60), 1.0)
    assert track.estimate().age == pytest.approx(real([30, 31, 29, 60])[0]) and fused == [3, 4]
    track.ages.append(16)  # written directly, not through add_age: still seen
    assert track.estimate().age == pytest.approx(real([30, 31, 29, 60, 16])[0]) and fused == [3, 4, 5]
    track.box, track.last_seen = (5, 5, 55, 55), 2.0  # what changes every frame is read fresh
    assert track.estimate().box == (5, 5, 55, 55) and track.estimate().last_seen == 2.0 and fused == [3, 4, 5]


def test_is_alike_answers_as_the_similarity_does(two_people_photo):
    """The picture check's shortcut (the grey term bounds the similarity) must never change an answer."""
    from edge.detect import FaceDetector
    from edge.track import Signature
    image = cv2.imread(str(two_people_photo))
    faces = FaceDetector()(image)
    rng = np.random.default_rng(3)
    signatures = [Signature.of(image, f) for f in faces]
    for _ in range(60):  # the faces moved, scaled and lit otherwise: near and far from each other
        f = faces[int(rng.integers(len(faces)))]
        dx, dy, scale = rng.normal(0, 6), rng.normal(0, 6), rng.uniform(0.8, 1.2)
        x0, y0, x1, y1 = f.box
        moved = Face((x0 + dx, y0 + dy, x0 + dx + (x1 - x0) * scale, y0 + dy + (y1 - y0) * scale), f.score,
                     (f.left_eye[0] + dx, f.left_eye[1] + dy), (f.right_eye[0] + dx, f.right_eye[1] + dy))
        lit = np.clip(image.astype(np.float32) * rng.uniform(0.5, 1.5), 0, 255).astype(np.uint8)
        signatures.append(Signature.of(lit, moved))
    answers = {True: 0, False: 0}
    for a in signatures:
        for b in signatures[:8]:
            for least in (0.23, 0.5, 0.57):
                assert a.is_alike(b, least) == (a.similarity(b) >= least)
                answers[a.similarity(b) >= least] += 1
    assert min(answers.values()) > 50  # both answers were put to the test


def test_the_till_holds_a_customer_missed_for_a_frame_but_not_a_glimpse_nor_a_retracked_face():
    """The checks see a customer whose face was not found in this frame (turned away) while the tracker holds
    them; not a glimpse (a false detection, aged fewer than min_samples times: it held checks up), nor a held
    track where a face of this frame is (that face's person tracked anew)."""
    from collections import deque

    from edge.track import Track

    def face(x: float) -> Face:
        return Face((x, 0, x + 50, 50), 0.9, (x + 15, 20), (x + 35, 20))

    tracker = FaceTracker("till", min_similarity=None)
    tracks, _ = tracker.update(0.0, [face(0), face(200), face(400)])  # a parent, a child, a glimpse
    for track, ages in zip(tracks, (3, 3, 1)):
        for _ in range(ages):
            track.add_age(AgeEstimate(30.0), 0.0)
    seen, _ = tracker.update(0.2, [face(0)])  # the child turned away; the glimpse gone
    assert [t.track_id for t in tracker.at_the_till(seen, 3)] == [tracks[0].track_id, tracks[1].track_id]
    anew = Track("till", 99, face(205).box, 0.9, 0.4, 0.4, deque(maxlen=100))  # the child's face on a new track
    assert [t.track_id for t in tracker.at_the_till(seen + [anew], 3)] == [tracks[0].track_id, 99]
