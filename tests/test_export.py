"""ONNX export: the noise-driven sampler contract, the exported graph against the
PyTorch sampler, the sidecar, the Par04 convention, CaloFlow's refusal, refined
runs (refiner and reweight export, hmc is refused), the stand-alone example and
the CLI, on tiny trained runs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from caloman.cli import main
from caloman.errors import ExportError
from caloman.export import export_onnx, onnx_export, par04_voxel_order
from caloman.export.graph import par04_mesh
from caloman.export.runtime import OnnxSampler, compare_showers
from caloman.geometry import load_binning
from caloman.io import ShowerFile, write_showers
from caloman.refinement.runs import RefineSettings, refine_run
from caloman.runs import load_run, train_run
from caloman.simulation import ladder_energies, simulate_showers
from caloman.training import TrainingConfig

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

torch.set_num_threads(1)

BINNING = "ds1-photons"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_inference.py"
CALOMAN = {"latent_dim": 2, "hidden": [16], "flow_hidden": [16], "flow_transforms": 2, "layer_flow_hidden": [8],
           "layer_flow_transforms": 2, "flow_bins": 4, "layer_flow_bins": 4}
TINY = {
    "caloman": CALOMAN,
    # with the layer energies chained from the deepest layer (the graph flips them back) and
    # CaloFlow's chain in the condition (the graph re-encodes the flow's sample for it)
    "caloman-smooth": {**CALOMAN, "voxel_noise": "none", "layer_energy_order": "back", "condition_order": "front"},
    # the M-flow autoencoder: its decoder is a coupling flow's fused inverse, which traces too
    "caloman-mflow": {**CALOMAN, "voxel_noise": "none", "autoencoder": "mflow", "mflow_hidden": [16],
                      "mflow_transforms": 2, "mflow_bins": 4},
    "ambient-flow": {"transforms": 2, "hidden": [16], "bins": 4},
    "caloflow": {"layer_flow_transforms": 2, "layer_flow_hidden": [8], "layer_flow_bins": 4,
                 "shape_flow_transforms": 2, "shape_flow_hidden": [16], "shape_flow_bins": 4},
}
#: Two layers, 4 + 3 voxels: few enough for CaloFlow's autoregressive Flow II to be unrolled.
SMALL_BINNING_XML = """<Bins>
  <Bin name="photon" pid="22">
    <Layer id="0" r_edges="0,5,20" n_bin_alpha="2"/>
    <Layer id="1" r_edges="0,5,20,50" n_bin_alpha="1"/>
  </Bin>
</Bins>
"""


def _train(data: Path, binning, run_dir: Path, name: str):
    training = TrainingConfig(epochs=2, batch_size=64, patience=0, num_threads=1, seed=1)
    return train_run(data, binning, run_dir, model_kind=name.removesuffix("-smooth").removesuffix("-mflow"),
                     training=training,
                     model_overrides=TINY[name], command_line=["test"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny trained runs on 300 simulated dataset-1 photon showers (20 per ladder energy)."""
    root = tmp_path_factory.mktemp("runs")
    energies = ladder_energies(20)
    data = write_showers(root / "train.h5", energies, simulate_showers(BINNING, energies, seed=3), binning=BINNING)
    return {name: _train(data, BINNING, root / name, name).run_dir
            for name in ("caloman", "caloman-smooth", "caloman-mflow", "ambient-flow", "caloflow")}


@pytest.fixture(scope="module")
def refined(runs, tmp_path_factory) -> dict[str, Path]:
    """The tiny CaloMan run refined by each method, with a few epochs of each network."""
    root = tmp_path_factory.mktemp("refined")
    quick = RefineSettings.profile("quick")
    settings = dataclasses.replace(
        quick, classifier=dataclasses.replace(quick.classifier, hidden=(16,), epochs=3),
        latent_classifier=dataclasses.replace(quick.latent_classifier, hidden=(16,), epochs=3),
        refiner=dataclasses.replace(quick.refiner, hidden=(16,), transforms=2, epochs=2),
        hmc=dataclasses.replace(quick.hmc, burn_in=3, leapfrog_steps=2), hmc_trial_chains=4,
        dctr="mlp")  # the MLP's weights are a torch graph; the trees' are refused (test below)
    data = runs["caloman"].parent / "train.h5"
    out = {}
    for method in ("reweight", "refiner", "hmc"):
        refine_run(runs["caloman"], data, root / method, method=method, settings=settings, command_line=["test"])
        out[method] = root / method
    return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, convention in (("caloman", "caloman"), ("caloman", "par04"), ("caloman-smooth", "caloman"),
                             ("caloman-mflow", "caloman"), ("ambient-flow", "caloman")):
        out[name, convention] = export_onnx(runs[name], root / f"{name}-{convention}.onnx",
                                            convention=convention).onnx_path
    return out


def _noise(model, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Incident energies (n,) log-uniform over the trained range and the model's noise."""
    generator = torch.Generator().manual_seed(seed)
    low, high = model.trained_energy_range()
    energies = torch.exp(torch.empty(n).uniform_(np.log(low), np.log(high), generator=generator))
    shape = model.noise_shape()
    return (energies, torch.randn(n, shape.normal, generator=generator),
            torch.rand(n, shape.uniform, generator=generator))


# -- the exported graph against PyTorch ---------------------------------------------------------
def _compare(runs, exports, name: str, n: int, seed: int):
    model = load_run(runs[name]).model
    path = exports[name, "caloman"]
    shape = model.noise_shape()
    energies, normal, uniform = _noise(model, n, seed)
    with torch.inference_mode():
        expected = model.sample_from_noise(energies, normal, uniform if shape.uniform else None).numpy()
    got = OnnxSampler(path, shape.normal, shape.uniform).run(energies.numpy(), normal.numpy(), uniform.numpy())
    return compare_showers(got, expected, model.threshold), got, expected, model


def test_the_onnx_sampler_runs_a_large_batch_in_pieces_with_their_own_noise(runs, exports, monkeypatch):
    model = load_run(runs["caloman"]).model
    shape = model.noise_shape()
    energies = np.full(10, 1e4, dtype=np.float32)
    monkeypatch.setattr("caloman.export.runtime.NOISE_VALUES", 4 * (shape.normal + shape.uniform))
    sampler = OnnxSampler(exports["caloman", "caloman"], shape.normal, shape.uniform, seed=2)
    calls = []
    run = sampler.run
    sampler.run = lambda e, normal, uniform=None: calls.append(len(e)) or run(e, normal, uniform)
    showers = sampler(energies)
    assert calls == [4, 4, 2] and showers.shape == (10, model.n_voxels) and (showers >= 0).all()
    assert not np.array_equal(showers[:2], showers[4:6])  # each piece draws its own noise


@pytest.mark.parametrize("n", [1, 64])
@pytest.mark.parametrize("name", ["ambient-flow", "caloman-smooth", "caloman-mflow"])
def test_onnx_matches_pytorch_voxel_by_voxel(runs, exports, name, n):
    """Without CaloMan's voxel noise every voxel agrees within 1e-4 relative (1e-6 MeV absolute)."""
    for seed in range(4 if n == 1 else 2):
        agreement, *_ = _compare(runs, exports, name, n, seed)
        assert agreement.voxels_off == 0, agreement
        assert agreement.max_relative_error < 1e-4 and agreement.max_energy_relative_error < 1e-4


def test_back_layer_order_survives_the_run_file(runs):
    model = load_run(runs["caloman-smooth"]).model
    assert model.config.layer_energy_order == "back" and model._pipeline().energies.order == "back"
    assert model.config.condition_order == "front" and model.reencodes_condition
    assert load_run(runs["caloman"]).model._pipeline().energies.order == "front"


@pytest.mark.parametrize("n", [1, 64])
def test_onnx_matches_pytorch_with_voxel_noise(runs, exports, n):
    """With the Poisson voxel noise the same noise gives the same showers, except where float32
    rounding moves a voxel's draw across a count boundary: that voxel differs by one quantum and
    the renormalisation spreads it over its layer. Shower energies still agree within 1e-4."""
    for seed in range(4 if n == 1 else 2):
        agreement, got, expected, model = _compare(runs, exports, "caloman", n, seed)
        assert agreement.max_energy_relative_error < 1e-4, agreement
        assert agreement.voxels_off <= 0.02 * agreement.voxels, agreement
        layers = model._pipeline().layers
        assert np.allclose(layers.layer_energies(got), layers.layer_energies(expected), rtol=1e-4, atol=1e-3)


# -- the graph's own spline inverse ---------------------------------------------------------------
@pytest.mark.parametrize("bins, bound", [(8, 5.0), (4, 14.0)])
def test_graph_spline_inverse_is_the_eager_one(bins, bound):
    """The traced flows use rqs_inverse_graph (fewer operations): the same map as rqs_inverse,
    exact in float64, to float32 rounding in float32, identity outside [-bound, bound]."""
    from caloman.models.flows import rqs_inverse, rqs_inverse_graph
    generator = torch.Generator().manual_seed(bins)
    params = torch.randn(4000, 5, 3 * bins - 1, generator=generator, dtype=torch.float64)
    y = torch.randn(4000, 5, generator=generator, dtype=torch.float64) * bound * 0.6
    y[:40] = torch.linspace(-2 * bound, 2 * bound, 40)[:, None]  # outside, and on the bounds
    assert torch.allclose(rqs_inverse_graph(params, y, bound), rqs_inverse(params, y, bound), rtol=1e-12, atol=1e-12)
    reference = rqs_inverse(params, y, bound)
    got = rqs_inverse_graph(params.float(), y.float(), bound).double()
    assert (got - reference).abs().max() < 1e-4 * bound
    outside = y.abs() > bound
    assert torch.equal(got[outside], y.float().double()[outside])


# -- the fused CaloMan graph ---------------------------------------------------------------------
def _random_flow(features: int, context: int, bins: int, bound: float, seed: int):
    from caloman.models.flows import ConditionalFlow
    torch.manual_seed(seed)
    flow = ConditionalFlow(features, context, transforms=3, hidden=(16, 16), bins=bins, bound=bound)
    with torch.no_grad():
        for p in flow.parameters():  # far from the initial near-identity splines
            p.add_(torch.randn_like(p) * 0.5)
    return flow.eval()


@pytest.mark.parametrize("features, bins, bound", [(5, 16, 14.0), (7, 8, 5.0)])
def test_graph_coupling_flow_is_the_flows_inverse(features, bins, bound):
    """GraphCouplingFlow on the state [z, condition columns] is transform_inverse: exact in
    float64, within float32 rounding (amplified by steep inverses) in float32; it keeps the
    condition columns bit for bit and is the identity outside [-bound, bound]."""
    from caloman.export.graph_flow import GraphCouplingFlow
    flow = _random_flow(features, 2, bins, bound, seed=features)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3000, features, generator=generator, dtype=torch.float64) * bound * 0.4
    z[:20] = torch.linspace(-2 * bound, 2 * bound, 20)[:, None]  # outside, and on the bounds
    columns = torch.rand(3000, 3, generator=generator, dtype=torch.float64)  # the state's condition columns
    to_condition = torch.tensor([[0.0, 0.5], [2.0, 0.0], [0.0, 0.25]], dtype=torch.float64)  # condition = columns @ it
    with torch.no_grad():
        reference = flow.double().transform_inverse(z, columns @ to_condition)
        got = GraphCouplingFlow(flow, to_condition)(torch.cat((z, columns), 1))
        assert torch.allclose(got[:, :features], reference, rtol=1e-10, atol=1e-10)
        assert torch.equal(got[:, features:], columns)
        flow.float()
        state = torch.cat((z, columns), 1).float()
        got32 = GraphCouplingFlow(flow, to_condition)(state)
    assert torch.equal(got32[:, features:], state[:, features:])
    assert (got32[:, :features].double() - reference).abs().max() < 1e-3 * bound
    outside = state[:, :features].abs() >= bound  # splines map [-bound, bound] onto itself
    assert outside.any() and torch.equal(got32[:, :features][outside], state[:, :features][outside])
    assert (got32[:, :features] != state[:, :features])[~outside].all()


def test_graph_coupling_flow_refuses_other_hypernetworks():
    from caloman.export.graph_flow import GraphCouplingFlow, supports
    from caloman.models.flows import ConditionalFlow
    flow = ConditionalFlow(4, 1, transforms=2, hidden=(8, 8), hypernet="residual-glu")
    assert not supports(flow)
    with pytest.raises(ValueError, match="MLP hypernetworks"):
        GraphCouplingFlow(flow)


def test_caloman_exports_fused_and_traced_graphs_that_both_match(runs, exports, tmp_path):
    """The default export records CaloMan through CaloManGraph (fewer operators, sidecar graph
    "fused"); fused=False traces sample_from_noise itself. Both match PyTorch at batch 1."""
    import onnx
    fused = exports["caloman-smooth", "caloman"]
    traced = export_onnx(runs["caloman-smooth"], tmp_path / "traced.onnx", fused=False)
    assert json.loads(fused.with_suffix(".json").read_text())["graph"] == "fused"
    assert traced.sidecar["graph"] == "traced"
    assert json.loads(exports["caloman-mflow", "caloman"].with_suffix(".json").read_text())["graph"] == "traced"

    def operators(path: Path) -> int:
        return sum(node.op_type != "Constant" for node in onnx.load(str(path)).graph.node)

    assert operators(fused) < operators(traced.onnx_path)
    model = load_run(runs["caloman-smooth"]).model
    shape = model.noise_shape()
    for seed in range(3):
        energies, normal, _ = _noise(model, 1, seed)
        with torch.inference_mode():
            expected = model.sample_from_noise(energies, normal).numpy()
        for path in (fused, traced.onnx_path):
            got = OnnxSampler(path, shape.normal, 0).run(energies.numpy(), normal.numpy())
            agreement = compare_showers(got, expected, model.threshold)
            assert agreement.voxels_off == 0 and agreement.max_relative_error < 1e-4, (path, agreement)


def test_fixed_batch_session_runs_that_batch_only(exports):
    from caloman.export.runtime import session_options
    path = exports["ambient-flow", "caloman"]
    session = ort.InferenceSession(str(path), session_options(1, batch_size=2), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 2
    n_normal = session.get_inputs()[0].shape[1]
    feeds = {"normal_noise": np.zeros((2, n_normal), np.float32), "incident_energy": np.full((2, 1), 1e4, np.float32)}
    assert session.run(None, feeds)[0].shape[0] == 2
    with pytest.raises(Exception, match="(?i)invalid dimensions"):
        session.run(None, {k: v[:1] for k, v in feeds.items()})


# -- refined runs --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 64])
def test_refiner_run_exports_one_graph_that_matches_its_pytorch_sampler(refined, tmp_path, n):
    """Refiner flow then the unchanged base sampler: for the same noise (the refiner's block in
    place of the latent blocks) the graph gives the refined model's showers."""
    result = export_onnx(refined["refiner"], tmp_path / "refiner.onnx")
    model = load_run(refined["refiner"]).model
    shape = model.noise_shape()
    assert [b.name for b in shape.blocks][0] == "refiner" and result.sidecar["noise"]["normal"] == shape.normal
    assert result.sidecar["refinement"]["method"] == "refiner" and result.sidecar["run"]["model_kind"] == "refined"
    sampler = OnnxSampler(result.onnx_path, shape.normal, shape.uniform)
    for seed in range(3 if n == 1 else 2):
        energies, normal, uniform = _noise(model, n, seed)
        with torch.inference_mode():
            expected = model.sample_from_noise(energies, normal, uniform).numpy()
            base = model.base.sample_from_noise(energies, normal, uniform).numpy()  # same layout, no refiner
        got = sampler.run(energies.numpy(), normal.numpy(), uniform.numpy())
        agreement = compare_showers(got, expected, model.threshold)
        assert agreement.max_energy_relative_error < 1e-4, agreement
        assert agreement.voxels_off <= 0.02 * agreement.voxels, agreement
        # the refiner changed the latent: the same noise fed to the base alone gives other showers
        assert not np.allclose(base.sum(1), expected.sum(1), rtol=1e-3)


@pytest.mark.parametrize("n", [1, 64])
def test_reweighted_run_exports_showers_and_their_weights(refined, tmp_path, n):
    result = export_onnx(refined["reweight"], tmp_path / "reweight.onnx")
    assert [o["name"] for o in result.sidecar["outputs"]] == ["showers", "weights"]
    assert result.sidecar["runtime"]["weighted"] == 1 and result.check.max_weight_relative_error < 1e-2
    model = load_run(refined["reweight"]).model
    shape = model.noise_shape()
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    energies, normal, uniform = _noise(model, n, seed=5)
    showers, weights = session.run(None, {"normal_noise": normal.numpy(), "uniform_noise": uniform.numpy(),
                                          "incident_energy": energies.numpy().reshape(-1, 1)})
    with torch.inference_mode():
        expected = model.sample_from_noise(energies, normal, uniform if shape.uniform else None)
        expected_weights = model.shower_weights(energies, torch.as_tensor(showers)).numpy()
    assert compare_showers(showers, expected.numpy(), model.threshold).max_energy_relative_error < 1e-4
    assert weights.shape == (n,) and (weights > 0).all()
    assert np.allclose(weights, expected_weights, rtol=1e-4)  # the classifier on the graph's own showers
    with pytest.raises(ExportError, match="par04 convention: its showers carry weights"):
        export_onnx(refined["reweight"], tmp_path / "par04.onnx", convention="par04")


def test_python_example_writes_the_weights_of_a_reweighted_export(refined, tmp_path):
    path = export_onnx(refined["reweight"], tmp_path / "reweight.onnx").onnx_path
    out = tmp_path / "weighted.h5"
    subprocess.run([sys.executable, str(EXAMPLE), str(path), "--energy", "65536", "--count", "9", "--batch-size", "4",
                    "--out", str(out)], check=True, capture_output=True, text=True)
    with ShowerFile(out, binning=BINNING) as f:
        weights = f.read_weights()
    assert weights is not None and weights.shape == (9,) and (weights > 0).all()


def test_hmc_run_is_refused_with_the_reason(refined, tmp_path, capsys):
    with pytest.raises(ExportError, match="Hamiltonian Monte Carlo.*static per-shower graph cannot hold"):
        export_onnx(refined["hmc"], tmp_path / "hmc.onnx")
    assert main(["export", str(refined["hmc"]), "--out", str(tmp_path / "hmc.onnx")]) == 2
    assert "--method refiner" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- the sidecar and the Par04 convention -------------------------------------------------------
def test_sidecar_states_binning_range_inputs_outputs_and_version(runs, exports):
    from caloman import __version__
    path = exports["caloman", "caloman"]
    meta = json.loads(path.with_suffix(".json").read_text())
    model = load_run(runs["caloman"]).model
    assert meta["format"] == "caloman-onnx/1" and meta["caloman_version"] == __version__
    assert meta["convention"] == "caloman" and meta["onnx_file"] == path.name
    assert meta["onnx_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["energy_range_mev"] == pytest.approx(list(model.trained_energy_range()))
    binning = meta["binning"]
    assert (binning["name"], binning["n_voxels"], binning["readout_threshold_mev"]) == (BINNING, 368, 1.0)
    assert binning["xml"] == (Path(__file__).resolve().parents[1] / "src/caloman/binnings/ds1-photons.xml").read_text()
    assert "(layer, alpha, r)" in binning["voxel_order"]
    assert meta["noise"]["normal"] == 743 and meta["noise"]["uniform"] == 368  # 5 + 2 + 368 + 368 spot energies
    assert [(i["name"], i["shape"]) for i in meta["inputs"]] == [
        ("normal_noise", ["batch", 743]), ("uniform_noise", ["batch", 368]), ("incident_energy", ["batch", 1])]
    assert [(o["name"], o["shape"], o["unit"]) for o in meta["outputs"]] == [("showers", ["batch", 368], "MeV")]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["normal_noise", "uniform_noise", "incident_energy"]
    assert [o.name for o in session.get_outputs()] == ["showers"]


def test_par04_voxel_order_is_r_phi_z(tmp_path):
    regular = tmp_path / "regular.xml"
    regular.write_text('<Bins><Bin name="electron" pid="11">' + "".join(
        f'<Layer id="{i}" r_edges="0,1,2,3" n_bin_alpha="2"/>' for i in range(4)) + "</Bin></Bins>")
    binning = load_binning(regular)
    assert par04_mesh(binning) == (3, 2, 4) and par04_mesh(load_binning(BINNING)) is None
    order = par04_voxel_order(binning)
    # CaloChallenge voxel (z, phi, r) sits at z * 6 + phi * 3 + r; Par04 output (r, phi, z) at r * 8 + phi * 4 + z.
    expected = np.array([z * 6 + phi * 3 + r for r in range(3) for phi in range(2) for z in range(4)])
    assert np.array_equal(order, expected)
    assert sorted(par04_voxel_order(load_binning(BINNING))) == list(range(368))


def test_par04_convention_is_noise_then_condition_and_voxels_over_energy(runs, exports):
    path = exports["caloman", "par04"]
    meta = json.loads(path.with_suffix(".json").read_text())
    model = load_run(runs["caloman"]).model
    energies, normal, uniform = _noise(model, 8, seed=3)
    scale = meta["par04"]["energy_scale_mev"]
    assert scale == pytest.approx(model.trained_energy_range()[1]) and len(meta["par04"]["condition"]) == 4
    condition = torch.zeros(8, 4)
    condition[:, 0] = energies / scale
    condition[:, 1:] = torch.rand(8, 3)  # angle and geometry one-hot: ignored
    inputs = torch.cat((normal, uniform, condition), dim=1).numpy()
    n_normal, n_uniform = model.noise_shape().normal, model.noise_shape().uniform
    width = n_normal + n_uniform
    assert meta["inputs"][0]["shape"] == ["batch", width + 4] and meta["runtime"]["input_size"] == width + 4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": inputs})[0]
    caloman = OnnxSampler(exports["caloman", "caloman"], n_normal, n_uniform).run(
        inputs[:, width] * scale, normal.numpy(), uniform.numpy())
    order = np.asarray(meta["par04"]["voxel_order"])
    assert np.allclose(got, caloman[:, order] / (inputs[:, width:width + 1] * scale), rtol=1e-5, atol=1e-9)


# -- CaloFlow: exported where its autoregressive flow is small, refused otherwise ---------------
def test_caloflow_exports_for_a_small_binning_and_refuses_dataset_1(runs, tmp_path):
    xml = tmp_path / "small.xml"
    xml.write_text(SMALL_BINNING_XML)
    rng = np.random.default_rng(0)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e5), 200))
    showers = energies[:, None] * np.exp(rng.normal(np.linspace(-3, -1, 7), 0.5, (200, 7)))
    data = write_showers(tmp_path / "small.h5", energies, showers, binning=xml)
    run = _train(data, load_binning(xml), tmp_path / "caloflow-small", "caloflow")
    result = export_onnx(run, tmp_path / "caloflow.onnx")
    assert result.check.voxels_off == 0 and result.check.max_relative_error < 1e-4

    out = tmp_path / "refused.onnx"
    with pytest.raises(ExportError, match="masked autoregressive flow.*368 x 2 = 736 network passes"):
        export_onnx(runs["caloflow"], out)
    assert list(tmp_path.glob("refused*")) == [] and list(tmp_path.glob(".refused*")) == []


# -- the stand-alone example ----------------------------------------------------------------------
def test_python_example_writes_a_calochallenge_file_for_both_conventions(exports, tmp_path):
    files = {}
    for convention in ("caloman", "par04"):
        files[convention] = tmp_path / f"{convention}.h5"
        subprocess.run([sys.executable, str(EXAMPLE), str(exports["caloman", convention]), "--energy", "65536",
                        "--count", "30", "--batch-size", "7", "--out", str(files[convention])],
                       check=True, capture_output=True, text=True)
    with ShowerFile(files["caloman"], binning=BINNING) as f:
        incident, showers = f.read()
    assert showers.shape == (30, 368) and np.all(incident == 65536.0) and (showers > 0).any()
    with ShowerFile(files["par04"], binning=BINNING) as f:
        assert np.allclose(f.read()[1], showers, rtol=1e-5, atol=1e-4)  # same noise, converted back
    refused = subprocess.run([sys.executable, str(EXAMPLE), str(exports["caloman", "caloman"]), "--energy", "1e9",
                              "--count", "3", "--out", str(tmp_path / "x.h5")], capture_output=True, text=True)
    assert refused.returncode != 0 and "trained on" in refused.stderr and not (tmp_path / "x.h5").exists()


# -- CLI and failures --------------------------------------------------------------------------------
def test_cli_exports_and_exits_2_on_a_bad_run_or_refusal(runs, tmp_path, capsys):
    assert main(["export", str(runs["ambient-flow"]), "--format", "onnx", "--out", str(tmp_path / "a.onnx")]) == 0
    assert (tmp_path / "a.onnx").is_file() and (tmp_path / "a.json").is_file()
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "b.onnx")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["export", str(runs["caloflow"]), "--out", str(tmp_path / "c.onnx")]) == 2
    assert "masked autoregressive" in capsys.readouterr().err
    assert main(["export", str(runs["caloman"]), "--out", str(tmp_path / "d.txt")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.onnx"]


def test_failed_self_check_leaves_nothing_behind(runs, tmp_path, monkeypatch):
    def disagree(*args, **kwargs):
        raise ExportError("the exported graph disagrees with the PyTorch sampler")

    monkeypatch.setattr(onnx_export, "_self_check", disagree)
    with pytest.raises(ExportError, match="disagrees"):
        export_onnx(runs["ambient-flow"], tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_benchmark_times_onnx_runtime_beside_pytorch(runs, tmp_path):
    from caloman.benchmark import BenchmarkConfig, render_markdown, time_onnx
    config = BenchmarkConfig(batch_sizes=(1, 3), threads=1, min_seconds=0.0)
    timings, note = time_onnx(load_run(runs["ambient-flow"]), np.array([1e4, 2e4]), config, tmp_path / "a.onnx")
    assert note is None and [(t.device, t.batch_size, t.threads) for t in timings] == [("cpu", 1, 1), ("cpu", 3, 1)]
    refused, why = time_onnx(load_run(runs["caloflow"]), np.array([1e4]), config, tmp_path / "c.onnx")
    assert refused == [] and "masked autoregressive" in why
    model = {"model": "ambient-flow", "parameters": 1, "training_seconds": None, "training_peak_rss_mib": None,
             "evaluation": {}, "timings": [{"batch_size": t.batch_size, "device": "cpu", "ms_per_shower": 2.0,
                                            "calls": 3, "threads": 1} for t in timings],
             "onnx_timings": [{"batch_size": t.batch_size, "device": "cpu", "ms_per_shower": 1.0, "calls": 3,
                               "threads": 1} for t in timings]}
    report = {"config": {"profile": "quick", "threads": 1, "batch_sizes": [1, 3], "classifier": "none"},
              "machine": {"torch": "2", "cpu": "cpu"}, "date": "2026-12-02", "caloman_version": "0",
              "command": "caloman benchmark", "data": {"n_reference": 2, "simulator_ms_per_shower": None},
              "reference_sampler": [], "models": [model, {**model, "model": "caloflow", "onnx_timings": [],
                                                         "onnx_note": why}]}
    text = render_markdown(report)
    assert "| ambient-flow (ONNX Runtime) | 1.0000 | 1.0000 |" in text
    assert "intra_op_num_threads = 1, inter_op_num_threads = 1" in text and "| ambient-flow | 0.50 | 0.50 |" in text
    assert "No ONNX Runtime row for caloflow: cannot export" in text


def test_reweight_run_with_tree_weights_is_refused(runs, tmp_path):
    """The boosted-tree DCTR classifier is scikit-learn's tree walker, not a torch graph."""
    quick = RefineSettings.profile("quick")
    settings = dataclasses.replace(quick, dctr="trees", trees=dataclasses.replace(quick.trees, max_iter=5))
    refined = tmp_path / "trees"
    refine_run(runs["caloman"], runs["caloman"].parent / "train.h5", refined, method="reweight", settings=settings,
               command_line=["test"])
    with pytest.raises(ExportError, match="boosted-tree"):
        export_onnx(refined, tmp_path / "trees.onnx")
    assert not (tmp_path / "trees.onnx").exists()
