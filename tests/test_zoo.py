"""The zoo: loading (shipped models, real-pipeline paths, bad input) and the toy pipeline's contracts."""

import json
import shutil

import numpy as np
import pytest
import torch

from workbench import zoo
from workbench.pipelines import ToyTextToImagePipeline
from workbench.toyclip import ToyCLIPModel


@pytest.fixture(scope="module")
def random_toy_pipeline():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = ToyCLIPModel(vision_layers=1, text_layers=1).eval()
    return ToyTextToImagePipeline(zoo.build_toy_t2i_unet(seed=0).eval(), zoo.sampling_scheduler(), clip)


def test_unknown_zoo_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"toyclip.*toy-t2i.*toy-uncond"):
        zoo.load("toy-gan")


def test_missing_model_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="zoo train toyclip"):
        zoo.load("toyclip", path=tmp_path / "nothing")


def test_corrupt_checkpoint_is_an_error_not_a_random_model(tmp_path):
    folder = tmp_path / "toyclip"
    shutil.copytree(zoo.DATA_DIR / "toyclip", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="could not be loaded"):
        zoo.load("toyclip", path=folder)


def test_shipped_models_load():
    clip = zoo.load("toyclip")
    t2i = zoo.load("toy-t2i")
    uncond = zoo.load("toy-uncond")
    assert isinstance(clip, ToyCLIPModel) and not clip.training
    assert isinstance(t2i, ToyTextToImagePipeline) and t2i.unet.dtype == torch.float32
    assert t2i.scheduler.config.beta_schedule == "scaled_linear" and t2i.scheduler.config.beta_end == 0.012
    assert uncond.unet.config.sample_size == 32 and uncond.unet.config.in_channels == 3


def test_load_pipeline_by_local_path_round_trips_a_real_pipeline_layout(tiny_sd_pipeline, tmp_path):
    tiny_sd_pipeline.save_pretrained(tmp_path / "sd")
    pipe = zoo.load_pipeline(tmp_path / "sd")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    for name in ("unet", "vae", "text_encoder"):
        for a, b in zip(
            getattr(pipe, name).state_dict().values(),
            getattr(tiny_sd_pipeline, name).state_dict().values(),
            strict=True,
        ):
            torch.testing.assert_close(a, b)


def test_real_or_tiny_pipeline_loads_local_weights_when_present(tiny_sd_pipeline, tmp_path):
    tiny_sd_pipeline.save_pretrained(tmp_path / "sd")
    demo = zoo.real_or_tiny_pipeline(tmp_path / "sd")
    assert demo.is_real and str(tmp_path / "sd") in demo.label
    unet = tiny_sd_pipeline.unet.state_dict()
    for key, value in demo.pipeline.unet.state_dict().items():
        torch.testing.assert_close(value, unet[key])


@pytest.mark.parametrize(
    ("tiny", "pipeline_class"), [("sd", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")]
)
def test_real_or_tiny_pipeline_falls_back_to_a_tiny_pipeline_and_removes_its_folder(
    tiny, pipeline_class, tmp_path, monkeypatch
):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where TemporaryDirectory builds the stand-in
    demo = zoo.real_or_tiny_pipeline(tmp_path / "no-weights-here", tiny=tiny)
    assert not demo.is_real and "not on this machine" in demo.label
    assert type(demo.pipeline).__name__ == pipeline_class
    assert list(tmp_path.iterdir()) == [], "the stand-in's temporary folder was left behind"
    # The pipeline still runs once its folder is gone: the weights live in memory.
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    first = demo.pipeline("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    second = demo.pipeline("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert first.shape == (1, 32, 32, 3) and np.array_equal(first, second)


def test_real_or_tiny_pipeline_rejects_an_unknown_layout():
    with pytest.raises(ValueError, match=r"tiny must be one of \['sd', 'sdxl'\], got 'sd3'"):
        zoo.real_or_tiny_pipeline(tiny="sd3")


def test_load_pipeline_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        zoo.load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="id_or_path"):
        zoo.load_pipeline("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="not a pipeline"):
        zoo.load_pipeline("toyclip")


def test_toy_pipeline_same_seed_same_images_and_save_load_round_trip(random_toy_pipeline, tmp_path):
    pipe = random_toy_pipeline
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, progress=False, output_type="pt")
    a = pipe("a red circle", generator=torch.Generator().manual_seed(5), **kwargs).images
    b = pipe("a red circle", generator=torch.Generator().manual_seed(5), **kwargs).images
    torch.testing.assert_close(a, b)
    pipe.save_pretrained(tmp_path / "toy")
    loaded = ToyTextToImagePipeline.from_pretrained(tmp_path / "toy")
    c = loaded("a red circle", generator=torch.Generator().manual_seed(5), **kwargs).images
    torch.testing.assert_close(a, c)
    assert a.shape == (1, 3, 32, 32) and a.min() >= 0 and a.max() <= 1


def test_toy_pipeline_batch_equals_single_runs(random_toy_pipeline):
    pipe = random_toy_pipeline
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, progress=False, output_type="pt")
    prompts = ["a red circle", "a blue square"]
    batch = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kwargs).images
    for i, (prompt, seed) in enumerate(zip(prompts, (1, 2), strict=True)):
        single = pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images
        # Batched and single float32 kernels round differently; 1e-4 is diffusers' own batch-consistency bound.
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-4, rtol=1e-4)


def test_toy_pipeline_encode_prompt_matches_stable_diffusions_contract(random_toy_pipeline, tiny_sd_pipeline):
    for pipe in (random_toy_pipeline, tiny_sd_pipeline):
        positive, negative = pipe.encode_prompt(["a red circle", "a square"], "cpu", 3, True)
        assert positive.shape[0] == 6 and negative.shape == positive.shape
        positive, negative = pipe.encode_prompt("a red circle", "cpu", 1, False)
        assert positive.shape[0] == 1 and negative is None


def test_toy_pipeline_bad_input(random_toy_pipeline):
    with pytest.raises(ValueError, match="multiples of 4"):
        random_toy_pipeline("a circle", height=30, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="output_type"):
        random_toy_pipeline("a circle", output_type="jpeg")
    with pytest.raises(ValueError, match="latents must have shape"):
        random_toy_pipeline("a circle", latents=torch.zeros(1, 3, 8, 8), num_inference_steps=2, progress=False)


def test_shipped_toyclip_reads_shape_and_colour_zero_shot():
    from workbench.toyclip import attribute_accuracy
    from workbench.toyworld import ToyWorld

    accuracy = attribute_accuracy(zoo.load("toyclip"), ToyWorld().sample(500, 98765))
    print("toyclip zero-shot accuracy on 500 held-out images:", accuracy)
    assert accuracy["shape"] >= 0.9 and accuracy["colour"] >= 0.9


def test_shipped_shape_colour_classifier_reads_every_background_on_held_out_images():
    from workbench.attribute_classifier import classify
    from workbench.toyworld import ATTRIBUTES, ToyWorld

    judge = zoo.load("toy-shape-colour-classifier")
    assert {a: list(v) for a, v in judge.config.attributes.items()} == {
        a: list(ATTRIBUTES[a]) for a in ("shape", "colour")
    }
    for background in ATTRIBUTES["background"]:
        batch = ToyWorld().sample(120, 98765, fixed={"background": background})
        read = classify(judge, batch.images)
        for attribute in ("shape", "colour"):
            accuracy = (read[attribute] == batch.labels[attribute]).mean()
            assert accuracy >= 0.97, (background, attribute, accuracy)


def test_shipped_toy_t2i_follows_prompts():
    from workbench.toyclip import zero_shot_classify
    from workbench.zoo_report import sample_prompted

    clip = zoo.load("toyclip")
    images, shapes, colours = sample_prompted(zoo.load("toy-t2i"), 48, num_inference_steps=20, seed=7)
    shape_accuracy = (zero_shot_classify(clip, images, "shape").numpy() == shapes).mean()
    colour_accuracy = (zero_shot_classify(clip, images, "colour").numpy() == colours).mean()
    print(f"toy-t2i prompt following on 48 samples: shape {shape_accuracy:.3f}, colour {colour_accuracy:.3f}")
    assert shape_accuracy >= 0.8 and colour_accuracy >= 0.8
    assert np.isfinite(images).all()


def test_toyclip_rejects_wrong_image_sizes(random_toy_pipeline):
    clip = random_toy_pipeline.text_encoder
    with pytest.raises(ValueError, match="32x32"):
        clip.encode_image(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        clip.encode_image(torch.zeros(2, 1, 32, 32))


def test_zero_shot_over_a_subset_of_values_renormalises_the_full_softmax(random_toy_pipeline):
    from workbench.toyclip import zero_shot_probabilities

    clip = random_toy_pipeline.text_encoder
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    subset = zero_shot_probabilities(clip, images, "shape", values=("circle", "square"))
    full = zero_shot_probabilities(clip, images, "shape")  # circle, square, triangle
    torch.testing.assert_close(subset, full[:, :2] / full[:, :2].sum(dim=1, keepdim=True))
    for values in (("circle", "hexagon"), ("circle",), ("circle", "circle")):
        with pytest.raises(ValueError, match="values must be two or more distinct shape values"):
            zero_shot_probabilities(clip, images, "shape", values=values)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_zoo_model_is_shipped_with_its_training_record(name):
    folder = zoo.DATA_DIR / name
    record = json.loads((folder / "training.json").read_text())
    assert record["command"].startswith(f"python -m workbench zoo train {name} ")
    assert zoo.load(name) is not None


def test_offset_noise_fine_tune_starts_from_toy_t2i_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "RUNS_DIR", tmp_path / "runs")
    out = zoo.train("toy-t2i-offset", steps=1, out_dir=tmp_path / "offset", offset=0.2)
    record = json.loads((out / "training.json").read_text())
    assert record["fine_tuned_from"] == "toy-t2i" and record["offset"] == 0.2 and "--offset 0.2" in record["command"]
    base, tuned = zoo.load("toy-t2i").unet, zoo.load("toy-t2i-offset", path=out).unet
    # one step of a fine-tune moves the weights a little, not from a fresh initialisation
    changes = [(a - b).abs().max() for a, b in zip(base.parameters(), tuned.parameters(), strict=True)]
    assert 0 < max(changes) < 0.05


def test_shape_colour_classifier_trains_through_the_zoo_and_records_accuracy_per_background(tmp_path):
    out = zoo.train("toy-shape-colour-classifier", steps=2, out_dir=tmp_path / "judge")
    record = json.loads((out / "training.json").read_text())
    assert record["command"].endswith("--steps 2 --seed 0") and record["attributes"]["shape"][2] == "triangle"
    assert set(record["held_out_accuracy_by_background"]) == {"black", "dark", "grey", "light", "white"}
    assert zoo.load("toy-shape-colour-classifier", path=out).heads["colour"].out_features == 4


def test_train_rejects_options_the_model_does_not_take(tmp_path):
    with pytest.raises(TypeError, match=r"takes options \[\], got \['vision_steps'\]"):
        zoo.train("toy-t2i", vision_steps=100, out_dir=tmp_path)
