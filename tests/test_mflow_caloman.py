"""The M-flow as CaloMan's generalised autoencoder, the manifold API of every variant, the
OOD check and ``--model-option``."""

import copy

import numpy as np
import pytest
import torch

from caloman.cli import main
from caloman.config import parse_config
from caloman.errors import ConfigError
from caloman.geometry import load_binning
from caloman.metrics.defects import DEFECTS
from caloman.models import build_model, parse_model_options
from caloman.models.mflow import MFlowAutoencoder, gram_log_det
from caloman.ood import OodConfig, fit_distance_scale, run_ood_check
from caloman.runs import load_run, save_run
from caloman.training import TrainingConfig, seed_everything, train_model
from test_models import TINY, tiny_binning, toy_showers

torch.set_num_threads(1)

MFLOW = {**TINY, "autoencoder": "mflow", "mflow_features": 6, "mflow_transforms": 2, "mflow_hidden": [16],
         "mflow_bins": 4}


def _fitted(overrides: dict, n: int = 300):
    """A tiny M-flow CaloMan with its preprocessing and its autoencoder inputs fitted."""
    seed_everything(0)
    model = build_model("caloman", tiny_binning(), overrides={**MFLOW, **overrides})
    incident, voxels = toy_showers(n)
    model.fit_preprocessing(incident, voxels)
    model.eval()
    with torch.no_grad():
        data = model.stages()[1].make_data(torch.as_tensor(incident, dtype=torch.float32),
                                           torch.as_tensor(voxels, dtype=torch.float32))
    return model, incident, voxels, data


def _double_with_orthonormal_basis(model):
    """A float64 copy of a fitted M-flow CaloMan whose stored basis is re-orthonormalised (QR),
    so that encode(decode(u)) == u holds to float64 rounding."""
    exact = copy.deepcopy(model).double()
    q, r = torch.linalg.qr(exact.autoencoder.basis)
    exact.autoencoder.basis.copy_(q * r.diagonal().sign())
    return exact


@pytest.mark.parametrize("conditional", [True, False])
def test_mflow_encoder_inverts_its_decoder_exactly(conditional):
    model, _, _, (voxels, condition) = _fitted({"conditional_autoencoder": conditional})
    ae = model.autoencoder
    assert isinstance(ae, MFlowAutoencoder) and bool(ae.inputs_fitted)
    # the reduction is a rotation onto 6 of the 9 log-voxels: orthonormal columns
    assert torch.allclose(ae.basis.T @ ae.basis, torch.eye(6), atol=1e-5)
    context = model._ae_context(condition[:64])
    u = 2 * torch.randn(64, 2)
    with torch.no_grad():
        decoded = ae.decode_logits(u, context)  # a point of the manifold, in the encoder's input space
        # float32: the basis's rounding (B^T B = I to ~1e-7) is amplified by the whitening scales
        assert torch.allclose(ae.encode(decoded, context), u, atol=1e-3)
        exact = _double_with_orthonormal_basis(model)  # the same maps in float64: exact to rounding
        u64, context64 = u.double(), exact._ae_context(condition[:64].double())
        assert torch.allclose(exact.autoencoder.encode(exact.autoencoder.decode_logits(u64, context64), context64),
                              u64, atol=1e-9)
        # the projection onto the manifold is idempotent there
        assert torch.allclose(ae.decode_logits(ae.encode(decoded, context), context), decoded, atol=1e-3)
        # a real shower is not on the untrained manifold: encoding is a projection, not the identity
        inputs = model._encoder_input(voxels[:64])
        assert not torch.allclose(ae.decode_logits(ae.encode(inputs, context), context), inputs, atol=1e-2)


def test_the_me_flow_encoder_is_separate_and_not_consistent_untrained():
    model, _, _, (voxels, condition) = _fitted({"autoencoder": "mflow-e"})
    ae = model.autoencoder
    assert ae.encoder is not None
    u = torch.randn(32, 2)
    context = model._ae_context(condition[:32])
    with torch.no_grad():
        assert not torch.allclose(ae.encode(ae.decode_logits(u, context), context), u, atol=1e-2)


def test_manifold_api_of_every_variant():
    for autoencoder in ("vae", "mflow"):
        model, incident, voxels, _ = _fitted({"autoencoder": autoencoder}, n=40)
        e, x = torch.as_tensor(incident), torch.as_tensor(voxels)
        log_p = model.log_prob_on_manifold(e, x)
        distance = model.reconstruction_error(e, x)
        assert log_p.shape == distance.shape == (40,) and torch.isfinite(log_p).all() and (distance >= 0).all()
        score = model.ood_score(e, x, distance_scale=0.5)
        assert torch.allclose(score, distance.double() / 0.5 - log_p)
        projected = model.project(e, x)
        assert projected.shape == x.shape and (projected >= 0).all()
        # the density's Jacobian term is gram_log_det of the decoder at the codes
        features = model._features(e.float(), x.float())
        codes = model._codes(features)
        context = model._ae_context(features.condition)
        standardised = (codes - model.latent_mean) / model.latent_std
        expected = (model.latent_flow.log_prob(standardised, features.condition).double()
                    - model.latent_std.log().sum() - gram_log_det(model.autoencoder.decode, codes, context)
                    + model.layer_energy.log_prob(features.layer_features, features.incident).double())
        assert torch.allclose(log_p, expected, atol=1e-4)


def _train(run, incident, voxels, schedule, **kw):
    seed_everything(0)
    model = build_model("caloman", tiny_binning(), overrides={**MFLOW, "mflow_schedule": schedule,
                                                               "voxel_noise": "none"})
    config = TrainingConfig(epochs=3, batch_size=64, learning_rate=3e-3, patience=0, seed=0, num_threads=1,
                            stage_epochs={"layer_energy": 1})
    history = train_model(model, incident, voxels, config, run, **kw)
    return model, config, history


@pytest.mark.parametrize("schedule, middle", [("sequential", "autoencoder"), ("alternating", "manifold_density")])
def test_both_schedules_train_save_load_and_resume(tmp_path, schedule, middle):
    incident, voxels = toy_showers(300)
    model, config, history = _train(tmp_path / "run", incident, voxels, schedule)
    assert [s.name for s in history.stages] == ["layer_energy", middle, "latent_flow"]
    stage = history.stage(middle)
    assert len(stage.epochs) == 3 and stage.best_val_loss < stage.epochs[0].val_loss
    latent = history.stage("latent_flow")
    assert latent.best_val_loss < latent.epochs[0].val_loss
    save_run(tmp_path / "run", model, tiny_binning(), config, history, command_line=["test"])

    # resume after an interruption in the middle stage equals the uninterrupted run (alternating:
    # the resumed epoch is a density epoch, so begin_epoch must set the phase from the epoch number)
    class Stop(Exception):
        pass

    def stop(name, record):
        if name == middle and record.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        _train(tmp_path / "resumed", incident, voxels, schedule, on_epoch_end=stop)
    resumed, _, resumed_history = _train(tmp_path / "resumed", incident, voxels, schedule, resume=True)
    assert [r.val_loss for r in resumed_history.stage(middle).epochs] == [r.val_loss for r in stage.epochs]
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


TINY_XML = """<Bins>
  <Bin name="photon" pid="22">
    <Layer id="0" r_edges="0,1,2" n_bin_alpha="3"/>
    <Layer id="1" r_edges="0" n_bin_alpha="1"/>
    <Layer id="2" r_edges="0,1,2,3" n_bin_alpha="1"/>
  </Bin>
</Bins>
"""


def test_a_saved_mflow_run_loads_and_generates_the_same_showers(tmp_path):
    (tmp_path / "tiny.xml").write_text(TINY_XML)
    binning = load_binning(tmp_path / "tiny.xml")
    assert binning.n_voxels == tiny_binning().n_voxels
    incident, voxels = toy_showers(300)
    model, config, history = _train(tmp_path / "run", incident, voxels, "sequential")
    save_run(tmp_path / "run", model, binning, config, history, command_line=["test"])
    loaded = load_run(tmp_path / "run")
    assert loaded.config.model_config["autoencoder"] == "mflow"
    energies = torch.as_tensor(incident[:50], dtype=torch.float32)
    for n in (1, 50):
        with torch.inference_mode():
            torch.manual_seed(3)
            a = model.sample(energies[:n])
            torch.manual_seed(3)
            b = loaded.model.sample(energies[:n])
        assert torch.equal(a, b) and torch.isfinite(a).all() and (a >= 0).all()


# -- --model-option ---------------------------------------------------------------------
def test_model_options_are_parsed_to_their_field_types():
    values = parse_model_options("caloman", ["autoencoder=mflow", "hidden=64,32", "kl_weight=1e-4",
                                             "conditional_autoencoder=false", "latent_dim=4", "mflow_bins=6"])
    assert values == {"autoencoder": "mflow", "hidden": (64, 32), "kl_weight": 1e-4,
                      "conditional_autoencoder": False, "latent_dim": 4, "mflow_bins": 6}
    model = build_model("caloman", tiny_binning(), overrides={**TINY, **values, "mflow_features": 0})
    assert isinstance(model.autoencoder, MFlowAutoencoder) and model.config.hidden == (64, 32)


@pytest.mark.parametrize("options, match", [
    (["autoencodr=mflow"], "valid options: preprocessing, autoencoder"),
    (["latent_dim=four"], "latent_dim must be an integer"),
    (["conditional_autoencoder=yes"], "true or false"),
    (["hidden=64,x"], "layer sizes"),
    (["latent_dim"], "KEY=VALUE"),
    (["latent_dim=3", "latent_dim=4"], "twice"),
])
def test_bad_model_options_raise_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        parse_model_options("caloman", options)


def test_mflow_option_values_are_checked_when_the_model_is_built():
    with pytest.raises(ConfigError, match="mflow_schedule"):
        build_model("caloman", tiny_binning(), overrides={**MFLOW, "mflow_schedule": "simultaneous"})
    with pytest.raises(ConfigError, match="encoder_input = 'log'"):
        build_model("caloman", tiny_binning(), overrides={**MFLOW, "encoder_input": "sqrt"})
    with pytest.raises(ConfigError, match="mflow_features"):
        build_model("caloman", tiny_binning(), overrides={**MFLOW, "mflow_features": 2})


def test_toml_model_table_selects_the_mflow():
    config = parse_config({"model": {"autoencoder": "mflow-e", "mflow_hidden": [16, 16], "mflow_features": 0}})
    model = build_model("caloman", tiny_binning(), overrides={**TINY, **config.model})
    assert model.autoencoder.kind == "mflow-e" and model.config.mflow_hidden == (16, 16)


def test_train_command_rejects_an_unknown_model_option(tmp_path, capsys):
    code = main(["train", str(tmp_path / "missing.h5"), "--binning", "ds1-photons", "--out", str(tmp_path / "run"),
                 "--model-option", "nonsense=1"])
    assert code == 2
    assert "valid options" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- the OOD check ----------------------------------------------------------------------
class _LayerEnergyScorer:
    """A stand-in with the manifold API: distance = |strip-layer energy / E_inc - its typical
    value|, density flat, so a strip-layer scale defect is an outlier and nothing else is."""

    kind = "stub"

    def __init__(self, binning):
        self.strip = binning.layer_slice(1)

    def reconstruction_error(self, e, x):
        return (x[:, self.strip].sum(1) / e - 0.2).abs()

    def log_prob_on_manifold(self, e, x):
        return torch.zeros(len(e), dtype=torch.float64)

    def ood_score(self, e, x, distance_scale=1.0):
        return self.reconstruction_error(e, x) / distance_scale - self.log_prob_on_manifold(e, x)


def test_ood_check_auroc_sees_a_defect_the_score_measures_and_not_the_null():
    binning = load_binning("ds1-photons")
    rng = np.random.default_rng(0)
    n = 600
    energies = np.full(n, 10_000.0)
    showers = np.zeros((n, binning.n_voxels))
    showers[:, binning.layer_slice(1)] = 2_000.0 * rng.normal(1, 0.01, (n, 1)) / binning.layer(1).n_voxels
    showers[:, binning.layer_slice(2)] = 100.0
    report = run_ood_check(_LayerEnergyScorer(binning), energies, showers, binning,
                           OodConfig(defects=("none", "strip_energy_+5%"), max_showers=n))
    auroc = {r["defect"]: r["auroc"] for r in report["results"]}
    assert auroc["strip_energy_+5%"]["distance"] > 0.95
    assert abs(auroc["none"]["distance"] - 0.5) < 0.1
    assert report["n_normal"] == report["n_outlier"] == n // 2


def test_distance_scale_balances_the_two_terms():
    distance, density = np.array([1.0, 3.0, 5.0]), np.array([10.0, 20.0, 30.0])
    scale = fit_distance_scale(distance, density)
    assert np.std(distance / scale) == pytest.approx(np.std(density))


def test_ood_config_rejects_unknown_defects():
    with pytest.raises(ConfigError, match="unknown defects"):
        OodConfig(defects=("none", "nope"))
    assert {d.name for d in DEFECTS} >= set(OodConfig().defects)
