"""Fig. 4-style overlays: slice choice, drawing, the local decoding check, and ``wff diagnose --overlay`` served."""

import math
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from wff.cli import main
from wff.client.grpc_client import DiagnosisClient, read_patient_files
from wff.client.overlay import (
    BENIGN_RGB,
    MALIGNANT_RGB,
    box_class,
    detector_input,
    image_config_from_model_config,
    layout_for,
    pick_slices,
    render_series,
)
from wff.config import ImageConfig

NAN = math.nan


class TestPickSlices:
    def test_voting_slices(self):
        """Slices whose box scores >= det_threshold, in series order."""
        d = np.array([NAN, 0.7, 0.2, 0.9], np.float32)
        scores = np.array([0.0, 0.8, 0.3, 0.6], np.float32)
        np.testing.assert_array_equal(pick_slices(d, scores, 0.5), [1, 3])

    def test_no_vote_falls_back_on_boxed_slices(self):
        """Without a voting slice every boxed slice is drawn."""
        d = np.array([0.4, NAN, 0.6], np.float32)
        np.testing.assert_array_equal(pick_slices(d, np.array([0.2, 0.0, 0.3], np.float32), 0.5), [0, 2])

    def test_no_box_draws_the_middle_slice(self):
        """A series without any box shows its middle slice."""
        np.testing.assert_array_equal(pick_slices(np.full(5, NAN, np.float32), np.zeros(5, np.float32), 0.5), [2])

    def test_at_most_the_best(self):
        """At most max_tiles slices, the highest scores, in series order."""
        scores = np.array([0.6, 0.9, 0.7, 0.95], np.float32)
        np.testing.assert_array_equal(pick_slices(np.full(4, 0.5, np.float32), scores, 0.5, max_tiles=2), [1, 3])


class TestBoxClass:
    @pytest.mark.parametrize("d, expected", [(0.8, ("malignant", 0.8, MALIGNANT_RGB)), (0.5, ("malignant", 0.5, MALIGNANT_RGB)), (0.3, ("benign", 0.7, BENIGN_RGB))])
    def test_class_probability_colour(self, d, expected):
        """D >= 0.5 is malignant with probability D (red); else benign with 1 - D (green)."""
        name, p, colour = box_class(d)
        assert (name, colour) == (expected[0], expected[2]) and p == pytest.approx(expected[1])


def box_pixel(layout, k: int, x: float, y: float) -> tuple[int, int]:
    """PNG pixel of detector pixel (x, y) in tile k."""
    ox, oy = layout.origin(k)
    return ox + round(x * layout.zoom), oy + round(y * layout.zoom)


class TestRenderSeries:
    def test_box_edges_in_class_colour_on_a_grey_image(self):
        """The box outline is drawn in its class colour exactly where the detector pixels map; inside stays grey."""
        images = np.full((3, 64, 64), 0.5, np.float32)
        boxes = np.array([[8, 10, 40, 50], [0, 0, 0, 0], [20, 20, 30, 30]], np.float32)
        d = np.array([0.9, NAN, 0.2], np.float32)
        scores = np.array([0.9, 0.0, 0.8], np.float32)
        image = np.asarray(render_series(images, boxes, d, scores, [0, 1, 2], "title", 0.5))
        layout = layout_for(3, 64)
        assert image.shape == (layout.size[1], layout.size[0], 3) and layout.zoom == 4
        x, y = box_pixel(layout, 0, 8, 30)  # left edge of tile 0's box
        assert tuple(image[y, x]) == MALIGNANT_RGB
        x, y = box_pixel(layout, 0, 24, 30)  # inside the box: the image, grey
        assert tuple(image[y, x]) == (128, 128, 128)
        x, y = box_pixel(layout, 2, 30, 25)  # right edge of tile 2's box (last pixel inside)
        assert tuple(image[y, x - 1]) == BENIGN_RGB
        ox, oy = layout.origin(1)  # the slice without a box has no colour at all
        tile = image[oy : oy + layout.tile_px, ox : ox + layout.tile_px]
        assert (tile == 128).all()

    def test_rejects_non_square_input(self):
        """Images must be the square detector input."""
        with pytest.raises(ValueError, match=r"\(n, H, H\)"):
            render_series(np.zeros((1, 4, 5), np.float32), np.zeros((1, 4)), np.zeros(1), np.zeros(1), [0], "t", 0.5)


class TestImageConfig:
    def test_size_from_detector_config(self):
        """The detector's input dims (JSON strings) give the size; the window stays the built-in one."""
        cfg = image_config_from_model_config({"input": [{"name": "detector_image", "dims": ["1", "128", "128"]}]})
        assert cfg == ImageConfig(size=128)

    def test_malformed_config(self):
        """A config without input dims says to rebuild the repository."""
        with pytest.raises(ValueError, match="wff repo build"):
            image_config_from_model_config({"input": []})


@pytest.mark.server
class TestServedOverlay:
    def test_diagnose_overlay_draws_the_served_boxes(self, limited_server, dicom_patient, tmp_path):
        """wff diagnose --overlay writes one PNG per series; the served box's edge has its class colour, the detector input there is grey."""
        out = tmp_path / "overlays"
        result = CliRunner().invoke(main, ["diagnose", str(dicom_patient), "--url", limited_server.grpc_url, "--overlay", str(out)])
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in out.iterdir()) == ["P001_s1_T1.png", "P001_s2_T2.png", "P001_s3_STIR.png"]
        files = read_patient_files(dicom_patient)
        with DiagnosisClient(limited_server.grpc_url, timeout_s=60) as client:
            dx = client.diagnose(files)
        slices = detector_input(files, dx, ImageConfig(size=64))
        first = int(np.flatnonzero(dx.slice_series == 0)[0])  # series 0: every slice votes (stand-in scores 0.9)
        x1, y1, x2, y2 = dx.slice_box[first]
        colour = box_class(float(dx.slice_d[first]))[2]
        with Image.open(out / "P001_s1_T1.png") as im:
            png = np.asarray(im.convert("RGB"))
        layout = layout_for(5, 64)
        assert png.shape == (layout.size[1], layout.size[0], 3)
        ym = (y1 + y2) / 2
        x, y = box_pixel(layout, 0, x1, ym)
        assert tuple(png[y, x]) == colour
        background = round(float(slices[first, int(ym), int(x1)]) * 255)
        assert tuple(png[y, x]) != (background,) * 3
        x, y = box_pixel(layout, 0, (x1 + x2) / 2, ym)  # inside the box: exactly the detector input
        assert tuple(png[y, x]) == (round(float(slices[first, int(ym), int((x1 + x2) / 2)]) * 255),) * 3

    def test_other_files_are_refused(self, limited_server, dicom_patient):
        """Overlays of files that decode to other series than the served diagnosis are refused."""
        files = read_patient_files(dicom_patient)
        with DiagnosisClient(limited_server.grpc_url, timeout_s=60) as client:
            dx = client.diagnose(files)
        t1_only = [(n, b) for n, b in files if n.startswith("SAG T1/")]
        with pytest.raises(ValueError, match="same folder"):
            detector_input(t1_only, dx, ImageConfig(size=64))
        with pytest.raises(ValueError, match="same folder"):
            detector_input(files, replace(dx, slice_series=dx.slice_series[::-1].copy()), ImageConfig(size=64))
