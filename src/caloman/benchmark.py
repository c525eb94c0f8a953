"""``caloman benchmark``: generation speed, training time, memory and fidelity,
measured in one run on one machine.

Speed is wall-clock time per shower at several batch sizes, from incident
energies to physical showers in MeV as a numpy array (preprocessing undone),
on the CPU with a fixed number of threads and, when CUDA is available, on the
GPU. Absolute times depend on the machine, so every benchmark also times a
*reference sampler* in the same process: the architecture of the authors'
released CaloMan sampler for dataset 1 photons (autoregressive spline flows for
layer energies and for a 35-dimensional latent space, a decoder of three
512-wide layers conditioned on the energies), rebuilt here from caloman's own
components with random weights. Its times are a yardstick, not a claim about
the authors' code.

Every model that exports (:mod:`caloman.export`) is also timed as an ONNX graph
with ONNX Runtime in the same run, at the same batch sizes, on the CPU with the
same thread count (and on the GPU when onnxruntime has the CUDA provider), noise
drawn with numpy inside each timed call.

Fidelity comes from :mod:`caloman.evaluation` on held-out showers, with the
strong classifier test (per incident energy) by default; every AUC is labelled
with its setting.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from caloman import __version__
from caloman.allocator import allocator_setting
from caloman.errors import ConfigError
from caloman.geometry import Binning, load_binning
from caloman.io import atomic_path, load_showers

logger = logging.getLogger("caloman.benchmark")

BENCHMARK_JSON = "benchmark.json"
BENCHMARK_MD = "benchmark.md"

#: Showers per incident energy of the dataset-1 ladder (15 energies) used by each profile.
PROFILE_SIZES = {
    # profile: (training showers per energy, held-out reference showers per energy)
    "quick": (1_000, 400),
    "full": (6_667, 1_400),  # 100,005 training and 21,000 held-out showers
}


@dataclass(frozen=True)
class BenchmarkConfig:
    """What the benchmark runs.

    Attributes:
        profile: "quick" (small data and models, minutes) or "full" (100,000
            training showers, each model's ``full`` size: CaloMan's paper-sized
            networks, the baselines sized for a 2-core CPU).
        models: model kinds to train (or load) and compare.
        binning: the binning of the built-in data (dataset-1 photons by default).
        batch_sizes: generation batch sizes timed.
        threads: torch CPU threads for the timings.
        seed: seeds the built-in data, training and generation.
        classifier: "strong" (default), "full", "quick" or "none" for the fidelity evaluation.
        reference_sampler: also time the re-built authors' sampler architecture.
        onnx: also time each model's ONNX export with ONNX Runtime (needs ``caloman[export]``).
        min_seconds: each batch size is timed for at least this long (after warm-up).
    """

    profile: str = "quick"
    models: tuple[str, ...] = ("caloman",)
    binning: str = "ds1-photons"
    batch_sizes: tuple[int, ...] = (1, 100, 10_000)
    threads: int = 2
    seed: int = 0
    classifier: str = "strong"
    reference_sampler: bool = True
    onnx: bool = True
    min_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.profile not in PROFILE_SIZES:
            raise ConfigError(f"profile must be one of {', '.join(PROFILE_SIZES)}, got {self.profile!r}")
        if not self.models:
            raise ConfigError("give at least one model to benchmark")
        if any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes must be positive, got {self.batch_sizes}")

    @property
    def train_per_energy(self) -> int:
        return PROFILE_SIZES[self.profile][0]

    @property
    def reference_per_energy(self) -> int:
        return PROFILE_SIZES[self.profile][1]


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Time per shower at one batch size on one device."""

    batch_size: int
    device: str
    ms_per_shower: float
    calls: int
    threads: int


def time_sampler(sample: Callable[[Tensor], Tensor], energies: np.ndarray, batch_size: int, *,
                 device: str = "cpu", min_seconds: float = 2.0, min_calls: int = 3, warmup_calls: int | None = None
                 ) -> Timing:
    """Median wall time per shower of ``sample(incident_energies) -> showers``,
    including the copy of the showers into a numpy array on the host.

    Incident energies for each call are drawn in turn from ``energies`` (MeV).
    ``warmup_calls`` untimed calls come first (default 3, or 1 for batches of
    1,000 and more, where one call already warms every code path).
    """
    if warmup_calls is None:
        warmup_calls = 3 if batch_size < 1000 else 1
    pool = torch.as_tensor(np.resize(np.asarray(energies, dtype=np.float32), max(batch_size, len(energies))))
    pool = pool.to(device)
    n = len(pool)

    def one_call(i: int) -> float:
        start = (i * batch_size) % max(1, n - batch_size + 1)
        batch = pool[start:start + batch_size]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = sample(batch)
            out.to("cpu").numpy()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for i in range(warmup_calls):
        one_call(i)
    durations: list[float] = []
    t_start = time.perf_counter()
    while len(durations) < min_calls or time.perf_counter() - t_start < min_seconds:
        durations.append(one_call(len(durations)))
        if len(durations) >= 10_000:
            break
    return Timing(batch_size=batch_size, device=device, ms_per_shower=1e3 * statistics.median(durations) / batch_size,
                  calls=len(durations), threads=torch.get_num_threads())


def time_model(sample: Callable[[Tensor], Tensor], energies: np.ndarray, config: BenchmarkConfig,
               devices: Sequence[str]) -> list[Timing]:
    """:func:`time_sampler` for every batch size of ``config`` on every device."""
    from caloman.progress import progress

    results = []
    for device in devices:
        for batch_size in progress(config.batch_sizes, desc=f"timing on {device}"):
            results.append(time_sampler(sample, energies, batch_size, device=device, min_seconds=config.min_seconds))
    return results


def timed_sampler(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """What one timed call runs: ``model.sample``, and for a weighted model (a ``reweight``
    refined run) also its :meth:`~caloman.models.base.ShowerModel.shower_weights`, copied to
    the host, so the weights' cost is in the time."""
    if not getattr(model, "weighted", False):
        return model.sample

    def sample(incident_energies: Tensor) -> Tensor:
        showers = model.sample(incident_energies)
        model.shower_weights(incident_energies, showers).to("cpu").numpy()
        return showers

    return sample


def time_loaded(loaded: Any, energies: np.ndarray, config: BenchmarkConfig) -> tuple[list[Timing], list[Timing]]:
    """Timings of a loaded run on every device and, for a refined run, of its base run in the
    same process (else an empty list): (timings, base timings)."""
    timings, base_timings = [], []
    base = loaded.model.base if loaded.refinement is not None else None
    for device in available_devices():
        for model, out in ((loaded.model, timings), (base, base_timings)):
            if model is not None:
                model.to(device)
                out += time_model(timed_sampler(model), energies, config, [device])
    loaded.model.to("cpu")
    return timings, base_timings


def available_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def time_onnx(loaded: Any, energies: np.ndarray, config: BenchmarkConfig, path: Path
              ) -> tuple[list[Timing], str | None]:
    """Export a loaded run to ``path`` and time it with ONNX Runtime at every batch size of
    ``config``, on the CPU with ``config.threads`` intra-op threads (one inter-op thread,
    sequential execution) and on CUDA when onnxruntime offers it. Returns the timings and,
    when there are none, why (the model refuses export, or onnxruntime is missing)."""
    from caloman.errors import CalomanError
    from caloman.export import export_onnx
    from caloman.export.runtime import OnnxSampler
    from caloman.export.runtime import available_devices as onnx_devices
    from caloman.progress import progress

    try:
        result = export_onnx(loaded, path, seed=config.seed)
        devices = onnx_devices()
    except CalomanError as exc:
        return [], str(exc)
    noise = result.sidecar["noise"]
    timings = []
    for device in devices:
        sampler = OnnxSampler(path, noise["normal"], noise["uniform"], threads=config.threads, device=device,
                              seed=config.seed)

        def sample(incident_energies: Tensor, sampler: OnnxSampler = sampler) -> Tensor:
            return torch.from_numpy(sampler(incident_energies.numpy()))

        for batch_size in progress(config.batch_sizes, desc=f"timing onnxruntime on {device}"):
            timing = time_sampler(sample, energies, batch_size, min_seconds=config.min_seconds)
            timings.append(dataclasses.replace(timing, device=device, threads=config.threads))
    return timings, None


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# ---------------------------------------------------------------------------
# the reference sampler (authors' architecture, random weights)
# ---------------------------------------------------------------------------
class ReferenceSampler(nn.Module):
    """The cost structure of the authors' released CaloMan sampler (dataset 1
    photons), rebuilt from caloman's components with random weights.

    Per call: a small coupling spline flow (4 transforms, residual
    hypernetworks of width 8) samples the layer energies given E_inc; a
    coupling spline flow (4 transforms, 8 bins, residual hypernetworks of 3
    blocks of width 64, as in their configuration) samples a 35-dimensional latent code given E_inc and
    the layer energies; a decoder (3 x 512, conditioned on the same) maps it to
    voxels, which are normalised per layer and multiplied by the layer
    energies. Plain torch modules throughout, without caloman's fused sampler.
    """

    def __init__(self, binning: Binning, latent_dim: int = 35) -> None:
        super().__init__()
        from caloman.models.flows import ConditionalFlow

        n_layers = len(binning.relevant_layers)
        self.slices = [binning.layer_slice(lid) for lid in binning.relevant_layers]
        self.layer_flow = ConditionalFlow(n_layers, 1, transforms=4, hidden=(8, 8), bins=8, bound=14.0,
                                          hypernet="residual-glu")
        self.latent_flow = ConditionalFlow(latent_dim, 1 + n_layers, transforms=4, hidden=(64, 64, 64), bins=8,
                                           bound=5.0, hypernet="residual-glu")
        self.decoder = nn.Sequential(nn.Linear(latent_dim + 1 + n_layers, 512), nn.ReLU(), nn.Linear(512, 512),
                                     nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, binning.n_voxels))
        self.eval()

    def forward(self, incident_energies: Tensor) -> Tensor:
        log_e = torch.log10(incident_energies / 1e3).unsqueeze(-1)
        u = torch.sigmoid(self.layer_flow(log_e).sample())
        layer_energies = u / u.sum(-1, keepdim=True) * incident_energies.unsqueeze(-1)
        context = torch.cat([log_e, torch.log1p(layer_energies)], dim=-1)
        z = self.latent_flow(context).sample()
        voxels = torch.sigmoid(self.decoder(torch.cat([z, context], dim=-1)))
        parts = [voxels[:, s] / (voxels[:, s].sum(-1, keepdim=True) + 1e-12) * layer_energies[:, i:i + 1]
                 for i, s in enumerate(self.slices)]
        return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------
@dataclass
class ModelResult:
    """Everything measured for one model."""

    model: str
    run_dir: str
    parameters: int
    training_seconds: float | None
    training_peak_rss_mib: float | None
    timings: list[Timing]
    evaluation: dict[str, Any] = field(default_factory=dict)
    onnx_timings: list[Timing] = field(default_factory=list)
    onnx_note: str | None = None
    base_timings: list[Timing] = field(default_factory=list)  # a refined run's base run, timed in the same run


def simulate_builtin_data(out_dir: Path, binning: Binning, config: BenchmarkConfig) -> tuple[Path, Path, float]:
    """Simulate the training and held-out reference files (different seeds).
    Returns their paths and the simulator's time per shower in ms."""
    from caloman.simulation.energies import ladder_energies
    from caloman.simulation.simulator import simulate_to_file

    train, reference = out_dir / "train.h5", out_dir / "reference.h5"
    t0 = time.perf_counter()
    n = 0
    for path, per_energy, seed in ((train, config.train_per_energy, config.seed + 1),
                                   (reference, config.reference_per_energy, config.seed + 2)):
        if not path.exists():
            energies = ladder_energies(per_energy)
            simulate_to_file(path, binning, energies, seed=seed)
            n += len(energies)
    ms = 1e3 * (time.perf_counter() - t0) / n if n else float("nan")
    return train, reference, ms


def _evaluate_run(loaded: Any, kind: str, reference: tuple[np.ndarray, np.ndarray], reference_file: Path,
                  out_dir: Path, config: BenchmarkConfig) -> dict[str, Any]:
    """Generate one shower per reference energy and evaluate them. A weighted run's showers
    go through a file with their ``weights`` and are evaluated weighted (as
    ``caloman evaluate --weights``), when the classifier setting allows weights."""
    from caloman.evaluation import EvaluationConfig, evaluate_arrays, evaluate_files
    from caloman.generation import generate, generate_to_file

    evaluation_dir = out_dir / "evaluation" / kind
    if loaded.model.weighted and config.classifier in ("strong", "none"):
        path = generate_to_file(loaded, out_dir / "generated" / f"{kind}.h5", reference[0], batch_size=10_000,
                                seed=config.seed, energy_policy="warn")
        return evaluate_files(path, reference_file, loaded.binning, evaluation_dir,
                              EvaluationConfig(classifier=config.classifier, seed=config.seed, weights=True))
    generated = np.concatenate(list(generate(loaded.model, reference[0], batch_size=10_000, seed=config.seed,
                                             energy_policy="warn")))
    return evaluate_arrays(reference, (reference[0], generated), loaded.binning, evaluation_dir,
                           EvaluationConfig(classifier=config.classifier, seed=config.seed))


def run_benchmark(out_dir: str | Path, config: BenchmarkConfig, *, run_dirs: dict[str, Path] | None = None,
                  train_file: Path | None = None, reference_file: Path | None = None) -> dict[str, Any]:
    """Train (or load) each model, time it, evaluate it; write ``benchmark.json``
    and ``benchmark.md`` into ``out_dir`` and return the results."""
    from caloman.evaluation import to_jsonable
    from caloman.runs import load_run, train_run
    from caloman.training import TrainingConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    binning = load_binning(config.binning)
    torch.set_num_threads(config.threads)
    started = datetime.now(UTC)
    simulator_ms = None
    if train_file is None or reference_file is None:
        train_file, reference_file, simulator_ms = simulate_builtin_data(out_dir / "data", binning, config)
    ref_energies, ref_showers = load_showers(reference_file, binning)
    devices = available_devices()

    results: list[ModelResult] = []
    trained: list[str] = []  # models trained with the profile (here or by an earlier call), not given as runs
    for kind in config.models:
        run_dir = (run_dirs or {}).get(kind)
        if run_dir is None:
            run_dir = out_dir / "runs" / kind
            trained.append(kind)
            if (run_dir / "model.safetensors").exists():
                loaded = load_run(run_dir)
            else:
                logger.info("training %s (%s profile) on %s", kind, config.profile, train_file)
                training = TrainingConfig.profile(config.profile, seed=config.seed, num_threads=config.threads)
                loaded = train_run(train_file, binning, run_dir, model_kind=kind, profile=config.profile,
                                   training=training)
        else:
            loaded = load_run(run_dir)
        if loaded.binning.n_voxels != binning.n_voxels:
            raise ConfigError(f"{run_dir} was trained with {loaded.binning.n_voxels} voxels, the benchmark's binning "
                              f"{config.binning} has {binning.n_voxels}: pass --binning or the run's own data")
        model = loaded.model
        history = loaded.history
        train_s = sum(s.seconds for s in history.stages) + history.preprocessing_seconds
        peaks = [s.peak_rss_mib for s in history.stages if s.peak_rss_mib is not None]

        logger.info("timing %s", kind)
        timings, base_timings = time_loaded(loaded, ref_energies, config)
        onnx_timings, onnx_note = [], "not timed (--no-onnx)"
        if config.onnx:
            logger.info("timing %s with ONNX Runtime", kind)
            onnx_timings, onnx_note = time_onnx(loaded, ref_energies, config, out_dir / "onnx" / f"{kind}.onnx")

        logger.info("generating %d showers with %s for the evaluation", len(ref_energies), kind)
        metrics = _evaluate_run(loaded, kind, (ref_energies, ref_showers), reference_file, out_dir, config)
        results.append(ModelResult(model=kind, run_dir=str(run_dir), parameters=count_parameters(model),
                                   training_seconds=train_s, training_peak_rss_mib=max(peaks) if peaks else None,
                                   timings=timings, evaluation=metrics, onnx_timings=onnx_timings,
                                   onnx_note=onnx_note, base_timings=base_timings))

    reference_timings: list[Timing] = []
    if config.reference_sampler:
        torch.manual_seed(config.seed)
        sampler = ReferenceSampler(binning)
        for device in devices:
            sampler.to(device)
            reference_timings += time_model(sampler, ref_energies, config, [device])

    report = {
        "caloman_version": __version__,
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": dataclasses.asdict(config),
        "machine": machine_info(),
        "data": {"train": str(train_file), "reference": str(reference_file), "n_reference": int(len(ref_energies)),
                 "simulator_ms_per_shower": simulator_ms},
        "models": [dataclasses.asdict(r) for r in results],
        "trained_with_profile": trained,
        "reference_sampler": [dataclasses.asdict(t) for t in reference_timings],
        "process_peak_rss_mib": peak_rss_mib(),
        "seconds": (datetime.now(UTC) - started).total_seconds(),
    }
    with atomic_path(out_dir / BENCHMARK_JSON) as tmp:
        tmp.write_text(json.dumps(to_jsonable(report), indent=1))
    with atomic_path(out_dir / BENCHMARK_MD) as tmp:
        tmp.write_text(render_markdown(report))
    return report


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "allocator": allocator_setting()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------
def _timing_lookup(timings: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    return {(t["device"], t["batch_size"]): t["ms_per_shower"] for t in timings}


def _ratio_table(models: list[dict[str, Any]], base: dict[tuple[str, int], float], header: list[str],
                 keys: list[tuple[str, int]]) -> list[str]:
    """Markdown rows: each model's time per shower divided by ``base``'s, per (device, batch size)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in models:
        t = _timing_lookup(m["timings"])
        cells = [_fmt(t[k] / base[k], ".2f") if k in t and k in base else "n/a" for k in keys]
        lines.append("| " + " | ".join([m["model"]] + cells) + " |")
    return lines


def _fmt(value: float | None, fmt: str = ".4f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, fmt)


def _auc_cell(result: dict[str, Any]) -> str:
    """AUC, with its standard error where the setting gives one."""
    if result.get("auc") is None:
        return "n/a"
    error = result.get("auc_error")
    return f"{result['auc']:.3f}" + (f" ± {error:.3f}" if error is not None else "")


def _worst_energy_cell(result: dict[str, Any]) -> str:
    """The largest per-energy AUC and its energy, or n/a without per-energy AUCs."""
    per_energy = result.get("auc_per_energy") or {}
    if not per_energy:
        return "n/a"
    key = max(per_energy, key=per_energy.get)
    return f"{per_energy[key]:.3f} ({float(key) / 1e3:.4g} GeV)"


def _onnx_lines(models: list[dict[str, Any]], cfg: dict[str, Any], header: list[str],
                keys: list[tuple[str, int]]) -> list[str]:
    """The ONNX Runtime settings, its time relative to PyTorch's, and why a model has no such row."""
    lines = []
    timed = [m for m in models if m.get("onnx_timings")]
    if timed:
        lines += ["", f"ONNX Runtime rows: the run exported with `caloman export` (CaloMan as the fused graph of "
                      f"`caloman.export.graph_caloman`), timed in this process with "
                      f"intra_op_num_threads = {cfg['threads']}, inter_op_num_threads = 1, sequential execution, all "
                      "graph optimisations, spinning worker threads (onnxruntime's default), dynamic batch axis; "
                      "noise drawn with numpy inside each timed call. ONNX Runtime's time "
                      "divided by PyTorch's (below 1 = faster):", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for m in timed:
            torch_t, onnx_t = _timing_lookup(m["timings"]), _timing_lookup(m["onnx_timings"])
            cells = [_fmt(onnx_t[k] / torch_t[k], ".2f") if k in onnx_t and k in torch_t else "n/a" for k in keys]
            lines.append("| " + " | ".join([m["model"]] + cells) + " |")
    for m in models:
        if not m.get("onnx_timings") and m.get("onnx_note"):
            lines += ["", f"No ONNX Runtime row for {m['model']}: {m['onnx_note']}"]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The benchmark table(s) as markdown."""
    from caloman.evaluation import classifier_summary_lines

    cfg = report["config"]
    machine = report["machine"]
    trained = report.get("trained_with_profile")
    if trained is None or trained:  # (older reports lack the field)
        title = f"# caloman benchmark ({cfg['profile']} profile)"
    else:
        title = "# caloman benchmark (given runs)"
    lines = [title, "",
             f"{report['date']}, caloman {report['caloman_version']}, torch {machine['torch']}, "
             f"{machine['cpu']}, {cfg['threads']} CPU threads"
             + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU")
             + (f"; allocator: {machine['allocator']}" if machine.get("allocator") else "") + ".", "",
             f"Command: `{report['command']}`", ""]
    ref = _timing_lookup(report["reference_sampler"])
    devices = sorted({t["device"] for m in report["models"] for t in (*m["timings"], *m.get("onnx_timings", []))})
    batch_sizes = cfg["batch_sizes"]

    lines += ["## Generation time (ms per shower, incl. post-processing to MeV)", ""]
    header = ["model"] + [f"{d} batch {b:,}" for d in devices for b in batch_sizes]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for m in report["models"]:
        rows.append((m["model"], _timing_lookup(m["timings"])))
        if m.get("base_timings"):
            rows.append((f"{m['model']}: its base run", _timing_lookup(m["base_timings"])))
        if m.get("onnx_timings"):
            rows.append((f"{m['model']} (ONNX Runtime)", _timing_lookup(m["onnx_timings"])))
    if ref:
        rows.append(("reference sampler (authors' architecture, random weights)", ref))
    for name, table in rows:
        lines.append("| " + " | ".join([name] + [_fmt(table.get((d, b))) for d in devices for b in batch_sizes]) + " |")
    keys = [(d, b) for d in devices for b in batch_sizes]
    lines += _onnx_lines(report["models"], cfg, header, keys)
    refined = [m for m in report["models"] if m.get("base_timings")]
    if refined:
        lines += ["", "Refined run's time divided by its base run's, both timed in this run (a reweight run's "
                      "time includes its weights):", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for m in refined:  # the table's rows only
            lines += _ratio_table([m], _timing_lookup(m["base_timings"]), header, keys)[2:]
    if ref:
        lines += ["", "Ratio to the reference sampler measured in the same run (below 1 = faster):", ""]
        lines += _ratio_table(report["models"], ref, header, keys)
    baseline = next((m for m in report["models"] if m["model"] == "caloman"), None)
    if baseline is not None and len(report["models"]) > 1:
        lines += ["", "Ratio of each model's generation time to CaloMan's, same run:", ""]
        lines += _ratio_table(report["models"], _timing_lookup(baseline["timings"]), header, keys)

    lines += ["", "## Training and size", "", "| model | parameters | training wall time | peak RSS |",
              "|---|---|---|---|"]
    for m in report["models"]:
        train = "n/a" if m["training_seconds"] is None else f"{m['training_seconds'] / 60:.1f} min"
        rss = "n/a" if m["training_peak_rss_mib"] is None else f"{m['training_peak_rss_mib']:.0f} MiB"
        lines.append(f"| {m['model']} | {m['parameters']:,} | {train} | {rss} |")

    lines += ["", f"## Fidelity on {report['data']['n_reference']:,} held-out showers", ""]
    setting = cfg["classifier"]
    header = ["model", "max separation power", "worst feature", f"AUC low ({setting})",
              f"AUC low-normed ({setting})", f"AUC high ({setting})", "worst-energy AUC low", "FPD x1e3", "KPD x1e3"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in report["models"]:
        ev = m["evaluation"]
        seps = ev.get("separation_power", {})
        worst = max(seps, key=seps.get) if seps else None
        clf = ev.get("classifier", {})
        cells = [m["model"], _fmt(seps.get(worst)) if worst else "n/a", worst or "n/a"]
        cells += [_auc_cell(clf.get(k, {})) for k in ("low", "low_normed", "high")]
        cells.append(_worst_energy_cell(clf.get("low", {})))
        cells += [_fmt((ev.get(k) or {}).get("value"), ".3f") for k in ("fpd", "kpd")]
        lines.append("| " + " | ".join(cells) + " |")
    for m in report["models"]:
        clf = m["evaluation"].get("classifier", {})
        if any(v.get("auc_per_energy") for v in clf.values()):
            lines += ["", f"### {m['model']}: classifier tests", "", *classifier_summary_lines(clf)]
    if report["data"].get("simulator_ms_per_shower") is not None and np.isfinite(
            report["data"]["simulator_ms_per_shower"]):
        lines += ["", f"Built-in simulator: {report['data']['simulator_ms_per_shower']:.3f} ms per shower "
                      "(simulation and writing)."]
    lines.append("")
    return "\n".join(lines)
