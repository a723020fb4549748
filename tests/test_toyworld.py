import numpy as np
import pytest

from workbench.toyworld import (
    ATTRIBUTES,
    BACKGROUND_LEVELS,
    COLOURS,
    ToyWorld,
    caption,
    from_model_space,
    load_digits,
    render,
    to_model_space,
)


def test_same_seed_same_images_and_different_seed_differs():
    a = ToyWorld().sample(16, 3)
    b = ToyWorld().sample(16, np.random.default_rng(3))
    c = ToyWorld().sample(16, 4)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    assert not np.array_equal(a.images, c.images)


def test_images_are_rgb_in_unit_range():
    batch = ToyWorld(image_size=48).sample(32, 0)
    assert batch.images.shape == (32, 3, 48, 48)
    assert batch.images.dtype == np.float32
    assert batch.images.min() >= 0.0 and batch.images.max() <= 1.0


def test_background_corners_have_the_labelled_brightness():
    batch = ToyWorld().sample(200, 1)
    levels = np.array([BACKGROUND_LEVELS[b] for b in batch.values("background")])
    corners = batch.images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # shapes never touch the corners
    np.testing.assert_allclose(corners, np.broadcast_to(levels[:, None, None], corners.shape), atol=1e-6)
    assert {"black", "white"} <= set(batch.values("background"))
    assert corners.min() == 0.0 and corners.max() == 1.0


def _one(**attributes):
    labels = {a: [ATTRIBUTES[a].index(v)] for a, v in attributes.items()}
    return render(labels, [16.0], [16.0])[0]


def test_plain_shape_centre_has_its_colour_and_marks_darken_it():
    common = dict(shape="circle", colour="green", size="large", background="black")
    plain = _one(mark="plain", **common)
    dotted = _one(mark="dotted", **common)
    np.testing.assert_allclose(plain[:, 16, 16], COLOURS["green"], atol=1e-6)
    assert dotted[:, 16, 16].sum() < 0.6 * plain[:, 16, 16].sum()
    striped = _one(mark="striped", **common)
    changed_rows = np.nonzero(np.abs(striped - plain).sum(axis=(0, 2)) > 0)[0]
    assert len(changed_rows) >= 4 and np.all(np.diff(changed_rows) == 3)  # one-pixel stripes, period 3


def test_size_orders_area_and_shape_is_where_we_put_it():
    areas = []
    for size in ATTRIBUTES["size"]:
        image = _one(shape="square", colour="red", size=size, mark="plain", background="black")
        mask = image.sum(axis=0) > 0.5
        areas.append(mask.sum())
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() + 0.5 - 16) < 0.6 and abs(ys.mean() + 0.5 - 16) < 0.6
    assert areas[0] < areas[1] < areas[2]


def test_shapes_are_distinct():
    images = [_one(shape=s, colour="blue", size="large", mark="plain", background="white") for s in ATTRIBUTES["shape"]]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(images[i] - images[j]).sum() > 20


def test_bias_sets_the_frequencies():
    world = ToyWorld(bias={"shape": {"circle": 0.8, "square": 0.2}, "colour": {"red": 0.7, "blue": 0.3}})
    batch = world.sample(20_000, 0)
    shape = np.bincount(batch.labels["shape"], minlength=3) / 20_000
    colour = np.bincount(batch.labels["colour"], minlength=4) / 20_000
    np.testing.assert_allclose(shape, [0.8, 0.2, 0.0], atol=0.015)
    np.testing.assert_allclose(colour, [0.7, 0.0, 0.3, 0.0], atol=0.015)
    size = np.bincount(batch.labels["size"], minlength=3) / 20_000
    np.testing.assert_allclose(size, [1 / 3] * 3, atol=0.015)


def test_fixed_attributes_and_captions_follow_the_labels():
    batch = ToyWorld().sample(50, 0, fixed={"shape": "triangle", "colour": "yellow"})
    assert set(batch.values("shape")) == {"triangle"}
    for i, text in enumerate(batch.captions):
        attrs = {a: ATTRIBUTES[a][batch.labels[a][i]] for a in ATTRIBUTES}
        assert text == caption(attrs)
        assert text.startswith(f"a {attrs['size']} yellow {attrs['mark']} triangle on a ")


def test_caption_words():
    full = dict(size="small", colour="red", mark="striped", shape="circle", background="dark")
    assert caption(full) == "a small red striped circle on a dark background"
    assert caption({"colour": "red"}) == "a red shape"
    assert caption({"shape": "square", "colour": "blue"}) == "a blue square"


def test_caption_dropout_drops_words():
    batch = ToyWorld().sample(400, 0, caption_dropout=0.5)
    assert any(c == "a shape" for c in batch.captions) or len({len(c.split()) for c in batch.captions}) > 3
    assert all(c.startswith("a ") for c in batch.captions)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(bias={"shape": {"circle": 0.5, "square": 0.2}}), "sum to 1"),
        (dict(bias={"shape": {"hexagon": 1.0}}), "unknown value 'hexagon'"),
        (dict(bias={"texture": {"x": 1.0}}), "unknown attribute 'texture'"),
        (dict(bias={"shape": {"circle": 1.5, "square": -0.5}}), ">= 0"),
        (dict(image_size=8), "image_size"),
    ],
)
def test_bad_world_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyWorld(**kwargs)


def test_bad_sample_arguments_raise():
    with pytest.raises(ValueError, match="fixed"):
        ToyWorld().sample(4, 0, fixed={"colour": "purple"})
    with pytest.raises(ValueError, match="n must be"):
        ToyWorld().sample(0, 0)
    with pytest.raises(ValueError, match="unknown value"):
        caption({"shape": "star"})


def test_model_space_round_trip():
    images = ToyWorld().sample(4, 0).images
    np.testing.assert_allclose(from_model_space(to_model_space(images)), images, atol=1e-6)
    assert to_model_space(images).min() >= -1.0


def test_digits_loader():
    images, labels = load_digits(image_size=16)
    assert images.shape == (1797, 1, 16, 16) and labels.shape == (1797,)
    assert images.max() == 1.0 and images.min() == 0.0 and set(labels) == set(range(10))
    with pytest.raises(ValueError, match="multiple of 8"):
        load_digits(image_size=12)
