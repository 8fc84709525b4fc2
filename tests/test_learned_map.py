"""The learned ("NTK") map: its file, its math against the exact kernel, training by
distillation on a tiny model, its memory in generation, and the training CLI's errors."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import ntkkv
from ntkkv.cache import state_sizes
from ntkkv.summaries import ExactState, Learned
from ntkkv.summaries.cluster_state import ClusterState
from ntkkv.summaries.clusters import assign_clusters
from ntkkv.summaries.learned import FILE_FORMAT, LearnedFeatures
from ntkkv.summaries.merge import merged_slots
from ntkkv.training import (
    TrainingConfig,
    calibration_ids,
    capture_attention,
    format_table,
    plot_curves,
    train,
)
from tiny import one_thread, random_prompt, tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCALING = 0.25
# a tiny setting: 4 layers, 2 KV heads, head_dim 16; budget 48 = 24 exact tokens + 5 clusters of 8 features
TINY = {"context_length": 160, "query_length": 32, "max_capacity_prompt": 48, "state_budget": 0.5,
        "window_size": 4, "num_features": 8, "lr": 2e-2, "eval_every": 10}


def clustered(batch=1, heads=2, n=48, d=16, clusters=3, spread=0.2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, heads, clusters, d, generator=generator)
    member = torch.randint(0, clusters, (batch, heads, n), generator=generator)
    keys = centres.gather(2, member[..., None].expand(-1, -1, -1, d)) + spread * torch.randn(batch, heads, n, d,
                                                                                            generator=generator)
    values = torch.randn(batch, heads, n, d, generator=generator)
    queries = torch.randn(batch, heads, 5, d, generator=generator)
    return keys, values, queries, member


def random_features(num_layers=4, kv_heads=2, head_dim=16, num_features=8, seed=3):
    scale = torch.rand(num_layers, kv_heads) + 0.5
    features = LearnedFeatures(num_layers, kv_heads, head_dim, num_features, scale=scale,
                               seed=seed)
    with torch.no_grad():  # as after training: biases are not zero
        features.query_bias.normal_(0, 0.1)
        features.key_bias.normal_(0, 0.1)
    return features


@pytest.fixture(scope="module")
def trained():
    """(model, features) of a short training run on the tiny model."""
    model = tiny_model()
    with one_thread():
        features = train(model, random_prompt(192, batch=3, seed=1), random_prompt(192, batch=1, seed=2),
                         TrainingConfig(**TINY, steps=40, init="random"))
    return model, features


# -- the file -----------------------------------------------------------------------------------

def test_a_frozen_map_on_another_dtype_reads_its_formula_and_sees_later_edits():
    """log φ_k(δ) = W_k δ + b_k − ½β|δ|² − ½ log F, for float64 inputs to a float32 map held once
    in float64 (the path of a CPU-loaded map on a GPU model); an in-place edit of the map is seen."""
    features = random_features().requires_grad_(False)
    with torch.no_grad():
        features.key_damping.uniform_(0.1, 1.0)
    deltas = torch.randn(1, 2, 7, 16, dtype=torch.float64)

    def by_hand(layer, features=features):
        weight, bias = features.key_weight[layer].double(), features.key_bias[layer].double()
        damping = features.key_damping[layer].double()
        expected = torch.einsum("bhnd,hfd->bhnf", deltas, weight) + bias[None, :, None, :]
        return expected - 0.5 * damping[None, :, None, None] * (deltas**2).sum(-1, keepdim=True) - 0.5 * math.log(8)

    torch.testing.assert_close(features.log_features(deltas, 2, "key"), by_hand(2))
    assert features.log_features(deltas, 2, "key").dtype == torch.float64
    with torch.no_grad():
        features.key_bias[2] += 1.0
    torch.testing.assert_close(features.log_features(deltas, 2, "key"), by_hand(2))
    with torch.inference_mode():  # as the evaluation runners call it, and load it
        torch.testing.assert_close(features.log_features(deltas, 1, "key"), by_hand(1))
        loaded_there = random_features(seed=5).requires_grad_(False)
        torch.testing.assert_close(loaded_there.log_features(deltas, 1, "key"), by_hand(1, loaded_there))


def test_file_round_trip_gives_the_same_parameters_and_state_reads(tmp_path):
    features = random_features()
    features.metadata = {"train_loss": [0.5, 0.25], "settings": {"lr": 0.01, "cluster_by": "kmeans"}}
    features.save(tmp_path / "kernel.pt")
    loaded = LearnedFeatures.load(tmp_path / "kernel.pt")
    assert loaded.metadata == features.metadata
    saved, read_back = features.state_dict(), loaded.state_dict()
    assert saved.keys() == read_back.keys()
    for name in saved:
        assert torch.equal(saved[name], read_back[name]), name
    keys, values, queries, member = clustered()
    reads = [ClusterState(f, layer_idx=2).build(keys, values, member, 3).read(queries, SCALING)
             for f in (features, loaded)]
    for original, again in zip(*reads):
        assert torch.equal(original, again)


def test_files_of_another_format_or_shape_are_refused_clearly(tmp_path):
    (tmp_path / "text.pt").write_text("not a map")
    with pytest.raises(ValueError, match="is not an ntkkv learned map file") as error:
        LearnedFeatures.load(tmp_path / "text.pt")
    assert "weights_only" not in str(error.value)  # torch's advice to unpickle anything is wrong here
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(ValueError, match="is not an ntkkv learned map file") as error:
        LearnedFeatures.load(tmp_path / "random.pt")
    assert "weights_only" not in str(error.value)
    torch.save({"format": FILE_FORMAT, "code": ValueError("a pickled object")}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="is not an ntkkv learned map file") as error:
        LearnedFeatures.load(tmp_path / "pickled.pt")
    assert "weights_only" not in str(error.value)
    torch.save({"format": "something-else/1", "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="found format 'something-else/1'"):
        LearnedFeatures.load(tmp_path / "other.pt")
    features = random_features()
    features.save(tmp_path / "kernel.pt")
    saved = torch.load(tmp_path / "kernel.pt", weights_only=True)
    assert saved["format"] == FILE_FORMAT
    saved["num_features"] = 12  # the declared shape no longer matches the tensors
    torch.save(saved, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match=r"tensors do not match its declared .* = \(4, 2, 16, 12\)"):
        LearnedFeatures.load(tmp_path / "mismatch.pt")


def test_a_map_for_another_model_shape_is_refused(tmp_path):
    LearnedFeatures(3, 2, 16, 8).save(tmp_path / "three_layers.pt")
    model = tiny_model()  # 4 layers
    expected = r"trained for \(layers, kv_heads, head_dim\) = \(3, 2, 16\), this model has \(4, 2, 16\)"
    with pytest.raises(ValueError, match=expected), ntkkv.compress(
            model, "snapkv", max_capacity_prompt=48, summary="learned", summary_path=str(tmp_path / "three_layers.pt"),
            state_budget=0.5):
        pass


# -- the map's math -----------------------------------------------------------------------------

def test_many_random_features_approximate_the_exact_exponential_kernel():
    """E[φ_q(x)·φ_k(δ)] = exp(x·δ): with 4096 random features, the state read around the cluster
    means is close to ExactState's, which computes Σ exp(s·q·k) v itself."""
    keys, values, queries, member = clustered(spread=0.15)
    features = LearnedFeatures(1, 2, 16, 4096, scale=torch.tensor([[0.7, 1.3]]), seed=1)
    log_mass, mean = ClusterState(features).build(keys, values, member, 3).read(queries, SCALING)
    exact = ExactState()
    exact.fold(keys, values, torch.ones(keys.shape[:3]))
    exact_log_mass, exact_mean = exact.read(queries, SCALING)
    assert (log_mass - exact_log_mass).abs().max() < 0.06
    assert ((mean - exact_mean).norm(dim=-1) / exact_mean.norm(dim=-1)).max() < 0.05


# -- capture and training -----------------------------------------------------------------------

def test_capture_records_every_layer_and_leaves_the_model_as_it_was():
    model = tiny_model()
    prompt = random_prompt(40)
    before = model(prompt).logits
    activations = capture_attention(model, prompt)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(model(prompt).logits, before)
    assert len(activations) == 4
    first = activations[0]
    assert first.queries.shape == (1, 4, 40, 16) and first.keys.shape == first.values.shape == (1, 2, 40, 16)
    assert first.queries.dtype == torch.float32 and first.scaling == SCALING
    # the keys are the ones the model caches (after RoPE)
    cache = model(prompt, use_cache=True).past_key_values
    assert torch.allclose(activations[2].keys, cache.layers[2].keys, atol=1e-6)


def test_training_lowers_the_loss_and_the_held_aside_error(trained):
    _, features = trained
    metadata = features.metadata
    curve = metadata["train_loss"]
    assert len(curve) == 40 and curve[-1] < 0.5 * curve[0]
    held = metadata["held_out"]
    assert held["learned"]["error"] < 0.9 * held["learned_init"]["error"]
    assert metadata["held_out_loss"]["steps"] == [0, 10, 20, 30, 40]
    assert metadata["held_out_loss"]["loss"][-1] < metadata["held_out_loss"]["loss"][0]
    assert set(held) == {"eviction", "merge", "learned_init", "learned"}
    assert [len(row["error_per_layer"]) for row in held.values()] == [4] * 4
    # 5 clusters of (16 μ + 1 n + 8 z + 8·16 S)/32 = 4.78125 tokens fill 23.9 of the half of 48
    assert metadata["plans"]["learned"] == {"memory": 48, "exact": 24, "clusters": 5, "summary_tokens": 23.90625}
    assert "| learned, trained | 24 | 23.9 |" in format_table(metadata)


def test_metadata_loads_with_weights_only_and_the_curves_plot(trained, tmp_path):
    _, features = trained
    features.save(tmp_path / "kernel.pt")
    assert LearnedFeatures.load(tmp_path / "kernel.pt").metadata == features.metadata
    plot_curves(features.metadata, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generation_with_a_trained_file_keeps_the_planned_memory(trained, tmp_path):
    model, features = trained
    features.save(tmp_path / "kernel.pt")
    budget, state_budget = 48, 0.5
    prompt = random_prompt(200, seed=5)
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=budget, window_size=4, summary="learned",
                        summary_path=str(tmp_path / "kernel.pt"), state_budget=state_budget):
        result = ntkkv.generate(model, prompt, max_new_tokens=1)
    # by hand: 5 clusters of 4.78125 tokens (23.9) in the half of 48; 48 - 24 = 24 exact tokens
    assert result.kv_kept[0] == [24] * 4
    assert state_sizes(result.cache) == pytest.approx([23.90625] * 4)
    # the map in memory (no file) gives the same tokens
    with ntkkv.compress(model, "snapkv", max_capacity_prompt=budget, window_size=4,
                        summary=Learned(state_budget, features=features)):
        again = ntkkv.generate(model, prompt, max_new_tokens=1)
    assert again.new_tokens == result.new_tokens


def test_calibration_ids_hold_out_other_texts():
    class Characters:  # one token per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    texts = ["a" * 50, "b" * 30, "c" * 25, "d" * 10]
    train_ids, held_ids = calibration_ids(Characters(), texts, sequence_length=20, sequences=2, held_out=1)
    # the last texts until one sequence fits ("d" is too short alone), then the others run on
    assert held_ids.tolist() == [[ord("c")] * 20]
    assert train_ids.tolist() == [[ord("a")] * 20, [ord("a")] * 20]
    with pytest.raises(ValueError, match=r"need 100 \+ 20"):
        calibration_ids(Characters(), texts, sequence_length=20, sequences=5, held_out=1)


def test_training_refuses_a_plan_with_no_room():
    with pytest.raises(ValueError, match="summary 'merge': .* leaves 4 exact tokens, not more than window_size=8"):
        train(tiny_model(), random_prompt(200, batch=1), random_prompt(200, batch=1),
              TrainingConfig(context_length=100, query_length=10, max_capacity_prompt=16, state_budget=12,
                             window_size=8, num_features=8))


# -- the CLI ------------------------------------------------------------------------------------

def load_cli():
    spec = importlib.util.spec_from_file_location("ntkkv_script_train_learned_map", ROOT / "train_learned_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags, message", [
    (["--context_length", "100"], "context_length must be larger than max_capacity_prompt=128"),
    (["--state_budget", "0"], "state_budget must be a fraction in (0, 1) or a number of tokens ≥ 1, got 0.0"),
    (["--window_size", "0"], "window_size must be a positive integer, got 0"),
    (["--cluster_by", "random"], "unknown cluster_by 'random'; choose one of: position, kmeans"),
    (["--sequences", "0"], "--sequences must be a positive integer, got 0"),
    (["--lr", "-1"], "lr must be a positive number, got -1.0"),
    (["--weight_decay", "-1"], "weight_decay must be a number ≥ 0, got -1.0"),
    (["--device", "tpu"], "unknown --device 'tpu'; choose one of: cpu, cuda, cuda:N, auto"),
    (["--dtype", "int8"], "unknown dtype 'int8'; choose one of:"),
    (["--haystack_dir", "/nonexistent"], "haystack folder '/nonexistent' does not exist"),
    (["--output", "/nonexistent/kernel.pt"], "--output '/nonexistent/kernel.pt': its folder does not exist"),
    (["--init", "zeros"], "unknown init 'zeros'; choose one of: random, merge"),
])
def test_cli_flag_errors_name_the_bad_value(flags, message, capsys):
    cli = load_cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_stops_before_loading_the_model(monkeypatch, capsys, tmp_path):
    cli = load_cli()

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_model", load_model)
    with pytest.raises(SystemExit):
        cli.main(["--num_features", "-3", "--output", str(tmp_path / "kernel.pt")])
    assert "num_features must be a positive integer, got -3" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_merge_init_starts_each_cluster_as_its_merged_slot():
    """init="merge": W ≈ 0 and no damping, so φ_q·φ_k ≈ 1 and a cluster reads as n·exp(s·q·μ)
    with the mean value, which is what a merged slot gives."""
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 50, 8, generator=generator)
    values = torch.randn(1, 2, 50, 8, generator=generator)
    queries = torch.randn(1, 2, 4, 8, generator=generator)
    evicted = torch.ones(1, 2, 50, dtype=torch.bool)
    assignment = assign_clusters(keys, evicted, 3, "kmeans")
    features = LearnedFeatures(1, 2, 8, 4, init="merge")
    log_mass, mean = ClusterState(features).build(keys, values, assignment, 3).read(queries, 0.5)
    slot_keys, slot_values, slot_bias = merged_slots(keys, values, assignment, 3)
    logits = queries @ slot_keys.transpose(-1, -2) * 0.5 + slot_bias[:, :, None, :]
    torch.testing.assert_close(log_mass, logits.logsumexp(-1), rtol=0, atol=0.05)
    torch.testing.assert_close(mean, logits.softmax(-1) @ slot_values, rtol=0, atol=0.05)
    with pytest.raises(ValueError, match="unknown init 'zeros'; choose one of: random, merge"):
        LearnedFeatures(1, 2, 8, 4, init="zeros")


def test_training_from_the_merged_slot_improves_on_it():
    """init="merge" starts at merged slots' error; training brings the held-aside error below it."""
    model = tiny_model()
    with one_thread():
        features = train(model, random_prompt(192, batch=3, seed=1), random_prompt(192, batch=1, seed=2),
                         TrainingConfig(**TINY, steps=30, init="merge"))
    curve, held = features.metadata["train_loss"], features.metadata["held_out"]
    assert curve[-1] < 0.8 * curve[0]
    assert held["learned"]["error"] < held["learned_init"]["error"]


@pytest.mark.parametrize("name, route, fit_kept", [("smollm2_learned_f2", False, False),
                                                   ("smollm2_learned_f2_route", True, False),
                                                   ("smollm2_learned_f2_route_fit", True, True)])
def test_the_shipped_smollm2_maps_load_for_smollm2(name, route, fit_kept):
    path = Path(__file__).resolve().parents[1] / "assets" / f"{name}.pt"
    features = LearnedFeatures.load(path)
    features.check_model(30, 3, 64)  # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64
    settings = features.metadata["settings"]
    assert features.num_features == 2 and settings["init"] == "merge"
    assert settings.get("route", False) is route and settings.get("fit_kept", False) is fit_kept
    held = features.metadata["held_out"]
    assert held["learned"]["error"] < held["merge"]["error"] < held["eviction"]["error"]
    if fit_kept:  # trained through the fit: better than its start and than fitted eviction alone
        assert held["learned"]["error"] < held["learned_init"]["error"] and \
            held["learned"]["error"] < held["fitted"]["error"]
