import cv2
import numpy as np
import pytest

from edge.detect import (VARIANTS, FaceDetector, box_iou, decode, generate_anchors, iou, iou_matrix, letterbox,
                         weighted_nms)


@pytest.mark.parametrize("variant, count", [("short_range", 896), ("full_range", 2304), ("back", 896)])
def test_anchor_counts_match_mediapipe(variant, count):
    anchors = generate_anchors(VARIANTS[variant])
    assert anchors.shape == (count, 2)
    assert anchors.min() > 0 and anchors.max() < 1


def test_full_range_anchor_grid_is_stride_4():
    anchors = generate_anchors(VARIANTS["full_range"])
    assert anchors[0] == pytest.approx([0.5 / 48, 0.5 / 48])
    assert anchors[1] == pytest.approx([1.5 / 48, 0.5 / 48])  # x varies fastest
    assert anchors[48] == pytest.approx([0.5 / 48, 1.5 / 48])


def test_decode_offsets_are_relative_to_the_anchor():
    anchors = np.array([[0.25, 0.5]], np.float32)
    raw = np.zeros((1, 16), np.float32)
    raw[0, :4] = [2, -3, 20, 10]  # centre offset (2, -3) px, size 20 x 10 px
    raw[0, 4:6] = [-5, -2]  # first keypoint offset
    boxes, keypoints, scores = decode(raw, np.array([0.0]), anchors, input_size=100)
    assert boxes[0] == pytest.approx([27 - 10, 47 - 5, 27 + 10, 47 + 5])
    assert keypoints[0, 0] == pytest.approx([20, 48])
    assert scores[0] == pytest.approx(0.5)


def test_decode_clips_huge_logits_without_overflow():
    anchors = np.zeros((2, 2), np.float32)
    with np.errstate(over="raise"):
        _, _, scores = decode(np.zeros((2, 16)), np.array([1e6, -1e6]), anchors, 10)
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(0.0)


def test_weighted_nms_merges_overlaps_and_keeps_separate_faces():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    keypoints = np.zeros((3, 6, 2), np.float32)
    scores = np.array([0.9, 0.6, 0.8], np.float32)
    kept = weighted_nms(boxes, keypoints, scores, iou_threshold=0.3)
    assert len(kept) == 2
    merged_box, _, merged_score = kept[0]
    assert merged_score == pytest.approx(0.9)
    assert merged_box == pytest.approx([0.4, 0.4, 10.4, 10.4])  # score-weighted mean
    assert kept[1][0] == pytest.approx([50, 50, 60, 60])


def test_iou():
    assert iou(np.array([0, 0, 10, 10.0]), np.array([[0, 0, 10, 10.0], [5, 0, 15, 10], [20, 20, 30, 30]])) == \
        pytest.approx([1.0, 1 / 3, 0.0])


def test_the_plain_and_the_matrix_iou_agree_with_iou():
    rng = np.random.default_rng(7)
    corners = rng.uniform(0, 100, (40, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, 60, (40, 2))], axis=1)
    boxes[5] = boxes[4]  # the same box twice, and one inside another
    boxes[6] = boxes[4] + [5, 5, -5, -5]
    matrix = iou_matrix(boxes)
    for i, box in enumerate(boxes):
        assert matrix[i] == pytest.approx(iou(box, boxes))
        assert [box_iou(tuple(box), tuple(other)) for other in boxes] == pytest.approx(iou(box, boxes))
    assert (matrix > 0).sum() > len(boxes) and (matrix == 0).any()  # overlaps and misses both checked
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching is not overlapping


def test_letterbox_keeps_aspect_and_scales_to_minus_one_one():
    image = np.full((90, 160, 3), 255, np.uint8)
    tensor, lb = letterbox(image, 192)
    assert tensor.shape == (192, 192, 3)
    assert lb.scale == pytest.approx(1.2) and lb.pad_x == 0 and lb.pad_y == 42
    assert tensor[100, 100] == pytest.approx([1, 1, 1]) and tensor[0, 0] == pytest.approx([-1, -1, -1])


def test_detector_finds_both_faces_in_the_shared_photo(two_people_photo):
    faces = FaceDetector()(cv2.imread(str(two_people_photo)))
    assert len(faces) == 2
    for face in faces:
        assert face.score > 0.5
        x0, y0, x1, y1 = face.box
        assert x0 <= face.left_eye[0] < face.right_eye[0] <= x1  # eyes inside the box, left first
        assert y0 <= face.left_eye[1] <= y1


def test_detector_finds_nothing_in_a_blank_frame():
    assert FaceDetector()(np.full((360, 640, 3), 128, np.uint8)) == []


def first_frames(video, count: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(video))
    frames = [image for ok, image in (capture.read() for _ in range(count)) if ok]
    capture.release()
    return frames


def test_detector_finds_the_face_in_every_carphone_frame(carphone_clip):
    detector = FaceDetector()
    frames = first_frames(carphone_clip, 30)
    assert len(frames) == 30 and all(len(detector(image)) == 1 for image in frames)


def test_decoding_only_the_anchors_that_score_enough_finds_the_same_faces(hamilton_clip):
    """Every frame of every camera is decoded in its pipeline's Python thread; only the anchors over the score
    threshold are (a few dozen of 2,304). The faces must be those of decoding them all, to the bit."""
    from edge.detect import _to_frame_pixels
    detector = FaceDetector(score_threshold=0.5)
    size = detector.variant.input_size
    compared = found = 0
    for frame in first_frames(hamilton_clip, 40):
        tensor, lb = letterbox(frame, size)
        raw_boxes, raw_scores = detector.session.run(None, {detector.input_name: tensor[None]})
        boxes, keypoints, scores = decode(raw_boxes[0], raw_scores[0], detector.anchors, size)  # all of them
        keep = (scores >= 0.5) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        every = [_to_frame_pixels(b, k, s, lb, frame.shape)
                 for b, k, s in weighted_nms(boxes[keep], keypoints[keep], scores[keep], 0.3)]
        every = [f for f in every if min(f.width, f.height) >= detector.min_face_px]
        assert detector(frame) == every
        compared, found = compared + 1, found + len(every)
    assert compared == 40 and found >= 20


def detector_graph(input_shape, outputs: dict) -> bytes:
    """A model with a picture input (unused) and the given outputs (name: shape), each a constant of zeros."""
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, shape,
                                                                               [0.0] * int(np.prod(shape))))
             for name, shape in outputs.items()]
    graph = helper.make_graph(nodes, "not_blazeface", [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_detector_of_another_variant_is_one_model_error():
    """A ValueError traceback at start, in `config check --models` and, through the reload's model check, one that
    ended the running daemon."""
    from edge.errors import ModelError
    shipped = VARIANTS["full_range"].onnx_path
    with pytest.raises(ModelError) as caught:
        FaceDetector(shipped, "short_range")
    assert str(caught.value) == (f"face detector {shipped}: its input is tensor(float) [1, 192, 192, 3], the full_range "
                                 "variant's; models.detector_variant = 'short_range' takes a 128x128 RGB float picture")


def test_a_detector_with_a_rank_1_output_is_one_model_error(tmp_path):
    """outputs[0].shape[1] was an IndexError."""
    from edge.errors import ModelError
    model = tmp_path / "flat.onnx"
    model.write_bytes(detector_graph([1, 192, 192, 3], {"age": [1]}))
    with pytest.raises(ModelError, match=r"its outputs are \[1\], not BlazeFace's boxes \[1, N, 16\] and scores"):
        FaceDetector(model)


def test_a_detector_with_other_anchors_is_one_model_error(tmp_path):
    from edge.errors import ModelError
    model = tmp_path / "anchors.onnx"
    model.write_bytes(detector_graph([1, 192, 192, 3], {"boxes": [1, 896, 16], "scores": [1, 896, 1]}))
    with pytest.raises(ModelError) as caught:
        FaceDetector(model)
    assert str(caught.value) == (f"face detector {model}: 896 anchors in the model, which is the short_range variant's "
                                 "count; models.detector_variant = 'full_range' expects 2304")


def test_the_model_check_says_a_detector_of_another_variant_and_goes_on(tmp_path, age_models):
    """check_models is what a SIGHUP reload runs: a failed line, never an exception out of it."""
    from edge.checkup import check_models
    from edge.config import parse_config
    config = parse_config({"store_id": "s", "cameras": [{"id": "c", "source": 0}],
                           "models": {"detector": str(VARIANTS["full_range"].onnx_path),
                                      "detector_variant": "short_range", "age_model": str(age_models[40])}})
    (detected, aged), detector = check_models(config)
    assert not detected.ok and "models.detector_variant = 'short_range'" in detected.detail and detector is None
    assert aged.ok
