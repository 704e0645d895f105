"""classifier.clip_rule: which slices make a training clip (wff.training.engine).

"labelled" is the paper's rule (the series' labelled slices only, N of them, repeated when
fewer); "window" is N consecutive slices of the series around a tumour slice.
"""

from __future__ import annotations

import numpy as np
import pytest

from pathlib import Path

from wff.config import PAPER, SMALL, ClassifierConfig, profile_from_dict
from wff.ensemble.crop import clip_indices, crop_clip, expand_box
from wff.ensemble.types import AnnotatedPatient, PatientRecord, PreparedPatient
from wff.training.engine import SeriesTrack, choose_centre, clip_slices, labelled_clip_indices, series_tracks, training_clip


def by_index(labelled, n, seed=0):
    return labelled_clip_indices(np.array(labelled), n, False, np.random.default_rng(seed)).tolist()


def at_random(labelled, n, seed=0):
    return labelled_clip_indices(np.array(labelled), n, True, np.random.default_rng(seed)).tolist()


class TestLabelledClipIndices:
    def test_exactly_n_labelled_by_index_is_all_of_them(self):
        """Labelled 3, 4, 5, 9 and N = 4: the clip is those four slices, the gap to 9 skipped."""
        assert by_index([3, 4, 5, 9], 4) == [3, 4, 5, 9]

    def test_fewer_than_n_by_index_repeat_in_order(self):
        """Labelled 2, 5 and N = 4: each repeated, in order (the paper's repeated extraction)."""
        assert by_index([2, 5], 4) == [2, 2, 5, 5]
        assert by_index([2, 5, 7], 4) == [2, 2, 5, 7]  # as clip_indices repeats a 3-slice series
        assert by_index([6], 3) == [6, 6, 6]

    def test_by_index_is_a_run_of_consecutive_labelled_entries(self):
        """More than N labelled: N consecutive entries of the labelled list, every start reached."""
        labelled = [1, 2, 4, 5, 6, 9]
        runs = {tuple(by_index(labelled, 3, seed)) for seed in range(200)}
        assert runs == {(1, 2, 4), (2, 4, 5), (4, 5, 6), (5, 6, 9)}

    def test_random_draw_is_sorted_distinct_and_labelled(self):
        """At random, N >= labelled count: N distinct labelled slices in DICOM order, not always a run."""
        labelled = [3, 4, 5, 9, 10, 12, 15]
        draws = [at_random(labelled, 4, seed) for seed in range(100)]
        for d in draws:
            assert d == sorted(d) and len(set(d)) == 4 and set(d) <= set(labelled)
        assert {tuple(d) for d in draws} - {tuple(labelled[i : i + 4]) for i in range(4)}  # some are not runs
        assert set().union(*map(set, draws)) == set(labelled)

    def test_random_draw_with_fewer_than_n_keeps_every_labelled_slice(self):
        """Fewer labelled than N: each once, the rest repeats drawn at random; sorted."""
        draws = [at_random([2, 5, 8], 5, seed) for seed in range(100)]
        for d in draws:
            assert len(d) == 5 and d == sorted(d) and set(d) == {2, 5, 8}
        assert len({tuple(d) for d in draws}) > 1

    def test_seeded_draw_is_reproducible(self):
        assert at_random([1, 3, 4, 7, 8, 11], 3, seed=7) == at_random([1, 3, 4, 7, 8, 11], 3, seed=7)

    def test_no_labelled_slice_is_refused(self):
        with pytest.raises(ValueError, match="labelled slice"):
            by_index([], 4)


def track(labelled, n_slices=20):
    return SeriesTrack(0, np.arange(100, 100 + n_slices), np.array(labelled), (0.0, 0.0, 8.0, 8.0), 1)


class TestClipSlices:
    def test_labelled_rule_uses_labelled_slices_only(self):
        """The "labelled" rule never takes an unlabelled slice; half the clips drawn at random, half by index."""
        cfg = ClassifierConfig(clip_rule="labelled", clip_len=4, random_slice_prob=0.5)
        labelled = [3, 4, 5, 9, 11, 14]
        rng = np.random.default_rng(0)
        clips = [clip_slices(track(labelled), cfg, rng).tolist() for _ in range(400)]
        assert all(set(c) <= set(labelled) and c == sorted(c) for c in clips)
        runs = {tuple(labelled[i : i + 4]) for i in range(3)}
        share_runs = np.mean([tuple(c) in runs for c in clips])
        # by index always gives a run; a random 4-of-6 draw gives one of the 3 runs with chance 3/15
        assert share_runs == pytest.approx(0.5 + 0.5 * 3 / 15, abs=0.06)

    def test_window_rule_is_the_centred_window(self):
        """The "window" rule: clip_indices around choose_centre, with the same random draws."""
        cfg = ClassifierConfig(clip_rule="window", clip_len=4)
        got = clip_slices(track([10, 11, 12], 30), cfg, np.random.default_rng(3))
        rng = np.random.default_rng(3)
        expected = clip_indices(30, choose_centre(30, np.array([10, 11, 12]), 4, cfg.random_slice_prob, rng), 4)
        np.testing.assert_array_equal(got, expected)


def one_series_patient(n_slices: int, labelled: dict[int, tuple[float, float, float, float]]) -> AnnotatedPatient:
    """One 32-px series; slice i has value i everywhere, so a clip's slices can be read back from its pixels."""
    slices = np.repeat(np.arange(n_slices, dtype=np.float32), 32 * 32).reshape(n_slices, 1, 32, 32)
    boxes = tuple(np.array([labelled[i]], np.float32) if i in labelled else np.zeros((0, 4), np.float32) for i in range(n_slices))
    info = ({"index": 0, "sequence": "T2", "rows": 32, "cols": 32},)
    prepared = PreparedPatient(slices, np.zeros(n_slices, np.int32), (1.0,), info)
    return AnnotatedPatient(PatientRecord("p0", 1, 50.0, ("lumbar",), "train", Path(".")), prepared, boxes)


class TestTrainingClip:
    def test_labelled_rule_crops_the_largest_box_on_labelled_slices(self):
        """A "labelled" training clip: the largest labelled box, cropped on labelled slices only, repeated as needed."""
        patient = one_series_patient(12, {2: (4, 4, 12, 12), 5: (2, 2, 20, 22), 9: (6, 6, 10, 10)})
        profile = SMALL.replace(image={"size": 32}, classifier={"clip_rule": "labelled", "clip_len": 6, "crop_size": 8})
        (tr,) = series_tracks([patient])
        assert tr.labelled.tolist() == [2, 5, 9] and tr.box == (2.0, 2.0, 20.0, 22.0)
        branches = set()
        for seed in range(20):
            clip = training_clip(patient, tr, profile, np.random.default_rng(seed), augment=False)
            rng = np.random.default_rng(seed)  # the same draws: branch, then slices
            at_rand = bool(rng.random() < profile.classifier.random_slice_prob)
            expected = labelled_clip_indices(tr.labelled, 6, at_rand, rng)
            branches.add(at_rand)
            box = expand_box(tr.box, profile.classifier.crop_margin, 32)
            np.testing.assert_array_equal(clip, crop_clip(patient.prepared.slices[:, 0], box, expected, 8))
            got = clip[:, 4, 4].round().astype(int).tolist()  # slice i has value i
            assert set(got) == {2, 5, 9} and got == sorted(got)
            if not at_rand:
                assert got == [2, 2, 5, 5, 9, 9]
        assert branches == {True, False}


class TestConfig:
    def test_profiles(self):
        """The paper profile builds clips by the paper's rule; small keeps the window."""
        assert PAPER.classifier.clip_rule == "labelled" and SMALL.classifier.clip_rule == "window"

    def test_unknown_rule_refused_with_the_choices(self):
        data = SMALL.to_dict()
        data["classifier"]["clip_rule"] = "middle"
        with pytest.raises(ValueError, match=r"classifier.clip_rule: 'middle'.*'window', 'labelled'"):
            profile_from_dict(data)
