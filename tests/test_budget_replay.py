"""The inference budget on a till video with known ages: far fewer age-network calls, no worse answers.

The video is composed at test time from UTKFace validation faces in ../shared (never committed):
customers one after another at a till, 8 s each at 10 fps, with head movement, light drift and noise."""

from __future__ import annotations

import json
from datetime import datetime

import cv2
import numpy as np
import pytest

from tskit import compose_till_video, tillsight, write_config
from training.data import iter_image_bytes, read_labels, select, split_of

CUSTOMERS = 10


@pytest.fixture(scope="module")
def till_video(tmp_path_factory, utkface):
    labels = select([l for l in read_labels(utkface / "labels.csv")
                     if split_of(l.file_name, 0.1) == "val" and 8 <= l.age <= 70], CUSTOMERS)
    photos = dict(iter_image_bytes(utkface, {l.file_name for l in labels}))
    faces = [cv2.imdecode(np.frombuffer(photos[l.file_name], np.uint8), cv2.IMREAD_COLOR) for l in labels]
    path = tmp_path_factory.mktemp("till") / "till.mp4"
    times = compose_till_video(faces, path, fps=10, seconds=8, gap_s=2.0)
    return path, times, np.array([l.age for l in labels])


def replay(tmp_path, broker, subscriber, video, budget: bool):
    config = write_config(tmp_path / f"budget-{budget}.toml", store_id="s", daemon_id="d",
                          cameras=[{"id": "c", "source": 0}], mqtt={"host": "127.0.0.1", "port": broker.port},
                          models={"age_model": "light"}, budget={"enabled": budget}, logging={"level": "warning"})
    before = len(subscriber.messages)
    result = tillsight("replay", str(video), "--config", str(config))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert subscriber.wait_for(lambda s: len([b for t, b in s.since(before) if t.endswith("/estimate") and b["final"]])
                               >= summary["tracks"])
    messages = subscriber.since(before)
    finals = [b for t, b in messages if t.endswith("/estimate") and b["final"]]
    alerted = {b["track"] for t, b in messages if t.endswith("/alert")}
    return summary, finals, alerted


def per_customer(finals, alerted, times):
    """Each customer's final age and whether they were challenged, matched by when their track began."""
    seconds = lambda stamp: datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()  # noqa: E731
    start = min(seconds(b["first_seen"]) for b in finals)
    ages, challenged = np.full(len(times), np.nan), np.zeros(len(times), bool)
    for body in finals:
        customer = int(np.argmin([abs(enter - (seconds(body["first_seen"]) - start)) for enter, _ in times]))
        ages[customer], challenged[customer] = body["age"], body["track"] in alerted
    return ages, challenged


def test_the_budget_ages_five_times_fewer_faces_and_answers_as_well(tmp_path, broker, subscriber, till_video):
    video, times, true_ages = till_video
    every, every_finals, every_alerted = replay(tmp_path, broker, subscriber, video, budget=False)
    budget, budget_finals, budget_alerted = replay(tmp_path, broker, subscriber, video, budget=True)
    assert every["tracks"] == budget["tracks"] == CUSTOMERS
    calls_every = every["faces_aged"] / every["tracks"]
    calls_budget = budget["faces_aged"] / budget["tracks"]
    print(f"age-network calls per customer: {calls_every:.1f} ageing every face, {calls_budget:.1f} with the budget")
    assert calls_every >= 5 * calls_budget
    ages_every, challenged_every = per_customer(every_finals, every_alerted, times)
    ages_budget, challenged_budget = per_customer(budget_finals, budget_alerted, times)
    mae_every, mae_budget = np.abs(ages_every - true_ages).mean(), np.abs(ages_budget - true_ages).mean()
    print(f"MAE of the final ages: {mae_every:.2f} every face, {mae_budget:.2f} with the budget; "
          f"|difference| mean {np.abs(ages_every - ages_budget).mean():.2f}")
    assert mae_budget <= mae_every + 0.5
    assert np.abs(ages_every - ages_budget).mean() <= 1.0
    minors = true_ages < 18
    assert challenged_budget[minors].sum() >= challenged_every[minors].sum()  # no minor let through
