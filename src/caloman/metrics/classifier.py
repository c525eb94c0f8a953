"""Classifier tests of the CaloChallenge ("the ultimate metric").

A fully connected network learns to tell reference showers (label 1) from
generated ones (label 0). The score on held-out showers, after isotonic
calibration, is reported as the ROC AUC (0.5: indistinguishable, 1: always told
apart) and as JSD = (ln 2 - BCE) / ln 2 (0: indistinguishable, 1: disjoint).

The protocol follows the challenge's ``evaluate.py`` (Krause et al., CaloChallenge
2022, ``--mode cls-low / cls-low-normed / cls-high``):

* inputs are not standardised; the incident energy enters as log10(E_inc / MeV);
* each class is shuffled and split into train / test / validation, the network
  is trained with Adam on BCE-with-logits, the epoch with the best *test*
  accuracy is kept (training stops early if that accuracy reaches 1);
* an isotonic regression fitted on the test split maps the kept network's
  probabilities, clipped to [1e-6, 1 - 1e-6], and AUC and JSD are measured on the
  validation split.

Two settings of the network exist: :meth:`ClassifierSettings.full` is the
challenge protocol, for numbers comparable with published tables;
:meth:`ClassifierSettings.quick` is a small, fast stand-in for unit tests only,
never evidence of fidelity. The project's yardstick of fidelity is the third
setting, "strong" (:mod:`caloman.metrics.strong`, gradient-boosted trees per
incident energy). Results carry the setting's name; never put two in one table.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score, roc_curve

from caloman.errors import ConfigError, InvalidEnergyError, TrainingDivergedError, VoxelCountError
from caloman.geometry import Binning
from caloman.metrics import ClassifierResult
from caloman.progress import ProgressBar

#: Input kinds of the challenge's classifier tests.
KINDS = ("low", "low_normed", "high")

#: Calibrated probabilities are clipped to [PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR].
PROBABILITY_FLOOR = 1e-6

#: Per-class train / test / validation counts the challenge uses for dataset 1
#: (its reference files hold 121,000 photon and 120,800 pion showers).
DATASET1_SPLIT_COUNTS = {"photon": (80_000, 20_000, 21_000), "pion": (80_000, 20_000, 20_800)}


@dataclass(frozen=True)
class ClassifierSettings:
    """Network, optimiser and data split of one classifier test.

    Attributes:
        name: label stored in every result ("full", "quick" or your own).
        hidden_layers: widths of the hidden layers (LeakyReLU after each, no dropout).
        learning_rate: Adam learning rate.
        batch_size: showers per optimiser step (also per evaluation batch).
        max_epochs: upper limit on training epochs.
        split_fractions: per-class train / test / validation fractions.
        split_counts: per-class train / test / validation counts; used instead of the
            fractions when each class has at least their sum (see :func:`split_sizes`).
        max_showers_per_class: subsample each class to at most this many showers.
        dtype: "float64" (the challenge sets torch's default dtype to float64) or "float32".
        device: "auto" (CUDA when available, else CPU), "cpu" or a torch device string.
        max_threads: torch CPU threads are capped at this (the library default otherwise).
    """

    name: str = "custom"
    hidden_layers: tuple[int, ...] = (2048, 2048, 2048)
    learning_rate: float = 2e-4
    batch_size: int = 1000
    max_epochs: int = 50
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_counts: tuple[int, int, int] | None = None
    max_showers_per_class: int | None = None
    dtype: str = "float64"
    device: str = "auto"
    max_threads: int = 2

    def __post_init__(self) -> None:
        problems = []
        if not self.hidden_layers or any(width < 1 for width in self.hidden_layers):
            problems.append(f"hidden_layers must be positive widths, got {self.hidden_layers}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.max_threads < 1:
            problems.append("batch_size, max_epochs and max_threads must be >= 1")
        if len(self.split_fractions) != 3 or min(self.split_fractions) <= 0 or sum(self.split_fractions) > 1 + 1e-9:
            problems.append(f"split_fractions must be three positive numbers summing to at most 1, "
                            f"got {self.split_fractions}")
        if self.split_counts is not None and (len(self.split_counts) != 3 or min(self.split_counts) < 1):
            problems.append(f"split_counts must be three positive integers, got {self.split_counts}")
        if self.max_showers_per_class is not None and self.max_showers_per_class < 5:
            problems.append(f"max_showers_per_class must be >= 5, got {self.max_showers_per_class}")
        if self.dtype not in ("float32", "float64"):
            problems.append(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if problems:
            raise ConfigError("invalid ClassifierSettings: " + "; ".join(problems))

    @classmethod
    def full(cls, binning: Binning) -> ClassifierSettings:
        """The CaloChallenge protocol, for numbers comparable with published tables.

        Input -> 2048 -> 2048 -> 2048 -> 1 logit (LeakyReLU, no dropout), BCE with
        logits, Adam lr 2e-4, batches of 1000, up to 50 epochs, float64, CUDA when
        available. Split per class: dataset 1 photons 80,000 / 20,000 / 21,000 and
        pions 80,000 / 20,000 / 20,800 (the challenge's counts; validation takes the
        rest), datasets 2 and 3 60 % / 20 % / 20 %. Slow on CPU (hours for dataset 1).
        """
        counts = DATASET1_SPLIT_COUNTS.get(binning.particle) if binning.is_dataset1 else None
        return cls(name="full", split_counts=counts)

    @classmethod
    def quick(cls) -> ClassifierSettings:
        """A small setting for tests and demos; never compare it with the challenge.

        Same inputs, calibration and best-epoch selection as :meth:`full`, but
        input -> 256 -> 256 -> 1 logit, Adam lr 1e-3, batches of 200, up to 15
        epochs, float32 on CPU, 60/20/20 split of at most 3,000 showers per class.
        Runs in seconds to tens of seconds on 2 CPU cores for dataset-1 sizes.
        """
        return cls(name="quick", hidden_layers=(256, 256), learning_rate=1e-3, batch_size=200, max_epochs=15,
                   max_showers_per_class=3_000, dtype="float32", device="cpu")


def resolve_settings(setting: str | ClassifierSettings, binning: Binning) -> ClassifierSettings:
    """Turn "full" / "quick" (or a ready :class:`ClassifierSettings`) into settings."""
    if isinstance(setting, ClassifierSettings):
        return setting
    if setting == "full":
        return ClassifierSettings.full(binning)
    if setting == "quick":
        return ClassifierSettings.quick()
    raise ConfigError(f"unknown classifier setting {setting!r}: use 'full', 'quick' or a ClassifierSettings")


# -- inputs -------------------------------------------------------------------

def check_showers(incident_energies: np.ndarray, showers: np.ndarray, binning: Binning,
                   where: str) -> tuple[np.ndarray, np.ndarray]:
    """Incident energies (N,) float64 and showers (N, V), checked against the binning and each other."""
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    showers = np.asarray(showers)  # converted to float64 only where used: the files may be large
    if showers.ndim != 2 or showers.shape[1] != binning.n_voxels:
        raise VoxelCountError(f"{where}: expected showers of shape (N, {binning.n_voxels}) for binning "
                              f"{binning.name}, got {showers.shape}; use the binning the showers were made with")
    if len(energies) != len(showers):
        raise InvalidEnergyError(f"{where}: {len(energies)} incident energies for {len(showers)} showers; "
                                 "give one incident energy per shower")
    if not (np.isfinite(energies).all() and (energies > 0).all()):
        raise InvalidEnergyError(f"{where}: incident energies must be finite and > 0 MeV")
    return energies, showers


def _layer_energies(showers: np.ndarray, binning: Binning) -> np.ndarray:
    """(N, n_relevant_layers) energy per relevant layer in MeV."""
    return np.stack([showers[:, binning.layer_slice(layer)].sum(axis=1) for layer in binning.relevant_layers],
                    axis=1)


def classifier_inputs(kind: str, incident_energies: np.ndarray, showers: np.ndarray,
                      binning: Binning) -> np.ndarray:
    """Input vectors of the challenge's classifiers, one row per shower.

    Args:
        kind: "low": [log10(E_inc), voxels / E_inc] -> (N, 1 + V).
            "low_normed": [log10(E_inc), voxels / (E_layer + 1e-16),
            log10(E_layer + 1e-8)] with one E_layer per relevant layer -> (N, 1 + V + L).
            "high": ``caloman.features.high_level_vector`` of the shower features
            (log10(E_inc), log10(E_layer + 1e-8), centres and widths / 100 mm,
            log10(E_tot + 1e-8), sparsity, ...) -> (N, F).
        incident_energies: (N,) or (N, 1) incident energies in MeV.
        showers: (N, V) voxel energies in MeV, already thresholded by the caller.
        binning: geometry of the showers.

    Returns:
        (N, n_inputs) float64. Inputs are not standardised (the challenge does not).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown classifier input kind {kind!r}: use one of {', '.join(KINDS)}")
    energies, showers = check_showers(incident_energies, showers, binning, f"classifier inputs ({kind})")
    showers = showers.astype(np.float64, copy=False)
    log_energy = np.log10(energies)[:, None]
    if kind == "low":
        return np.concatenate([log_energy, showers / energies[:, None]], axis=1)
    if kind == "low_normed":
        layer_energies = _layer_energies(showers, binning)
        voxels_per_layer = [binning.layer(layer).n_voxels for layer in binning.relevant_layers]
        per_voxel = np.repeat(layer_energies, voxels_per_layer, axis=1)
        return np.concatenate([log_energy, showers / (per_voxel + 1e-16), np.log10(layer_energies + 1e-8)], axis=1)
    # Imported here: caloman.features is optional for the low-level tests.
    from caloman.features import compute_features, high_level_vector
    return np.asarray(high_level_vector(compute_features(energies, showers, binning)), dtype=np.float64)


# -- split, calibration, scores -----------------------------------------------

def split_sizes(n_per_class: int, settings: ClassifierSettings) -> tuple[int, int, int]:
    """Per-class (train, test, validation) sizes for ``n_per_class`` showers per class.

    With ``split_counts`` and at least their sum of showers, train and test take
    their counts and validation the rest (as the challenge's ``np.split`` does).
    With fewer showers, the counts' proportions are used instead; without counts,
    ``split_fractions``. Train and test are rounded down, validation takes the rest.
    """
    if settings.split_counts is not None and n_per_class >= sum(settings.split_counts):
        n_train, n_test = settings.split_counts[:2]
    else:
        if settings.split_counts is not None:
            fractions = np.asarray(settings.split_counts, dtype=np.float64) / sum(settings.split_counts)
        else:
            fractions = np.asarray(settings.split_fractions, dtype=np.float64)
        n_train, n_test = (int(v) for v in (n_per_class * fractions[:2]).astype(np.int64))
    n_val = n_per_class - n_train - n_test
    if min(n_train, n_test, n_val) < 1:
        raise ConfigError(f"{n_per_class} showers per class are too few for a train/test/validation split; "
                          "give more showers")
    return n_train, n_test, n_val


def calibrate_probabilities(test_probabilities: np.ndarray, test_labels: np.ndarray,
                            probabilities: np.ndarray) -> np.ndarray:
    """Isotonic calibration fitted on (test_probabilities, test_labels), applied to
    ``probabilities``; outputs are clipped to [1e-6, 1 - 1e-6] and inputs outside the
    fitted range are clamped to it. Shapes (n_test,), (n_test,), (n,) -> (n,)."""
    isotonic = IsotonicRegression(out_of_bounds="clip", y_min=PROBABILITY_FLOOR, y_max=1.0 - PROBABILITY_FLOOR)
    isotonic.fit(np.asarray(test_probabilities, dtype=np.float64), np.asarray(test_labels, dtype=np.float64))
    return isotonic.predict(np.asarray(probabilities, dtype=np.float64))


def jensen_shannon_divergence(labels: np.ndarray, probabilities: np.ndarray,
                              weights: np.ndarray | None = None) -> float:
    """JSD = (ln 2 - BCE) / ln 2 from labels (n,) in {0, 1} and probabilities (n,) of label 1
    (BCE averaged with per-sample ``weights`` (n,) when given).

    This is the challenge's estimate of the Jensen-Shannon divergence in bits for
    balanced classes; the probabilities must lie strictly inside (0, 1).
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    bce = -np.average(y * np.log(p) + (1.0 - y) * np.log1p(-p), weights=weights)
    return float((math.log(2.0) - bce) / math.log(2.0))


# -- network and training -------------------------------------------------------

def build_classifier(n_inputs: int, hidden_layers: tuple[int, ...]) -> torch.nn.Sequential:
    """Fully connected network: Linear + LeakyReLU per hidden layer, one output logit."""
    layers: list[torch.nn.Module] = []
    width = n_inputs
    for hidden in hidden_layers:
        layers += [torch.nn.Linear(width, hidden), torch.nn.LeakyReLU()]
        width = hidden
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def _probabilities(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int) -> np.ndarray:
    model.eval()
    logits = torch.cat([model(inputs[start:start + batch_size]).reshape(-1)
                        for start in range(0, len(inputs), batch_size)])
    return torch.sigmoid(logits).double().cpu().numpy()


def _accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    # The challenge rounds the probability; numpy rounds 0.5 down (to even).
    return float(np.mean((probabilities > 0.5) == (labels > 0.5)))


def classifier_rows(n_reference: int, n_generated: int, settings: ClassifierSettings, seed: int,
                    max_showers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The showers a network test keeps, in the shuffled order its split uses.

    Each class is shuffled (seeded) and cut to the smaller class, to the settings'
    ``max_showers_per_class`` and to ``max_showers`` (the caller's memory bound).
    Returns row indices (n_per_class,) into the reference and into the generated sample.
    """
    rng = np.random.default_rng(seed)
    caps = [n_reference, n_generated, settings.max_showers_per_class, max_showers]
    n_per_class = min(cap for cap in caps if cap is not None)
    # Shuffle each class before cutting so the kept subset and the split are random.
    ref_keep = rng.permutation(n_reference)[:n_per_class]
    gen_keep = rng.permutation(n_generated)[:n_per_class]
    return ref_keep, gen_keep


def run_classifier_test(kind: str, reference: tuple[np.ndarray, np.ndarray],
                        generated: tuple[np.ndarray, np.ndarray], binning: Binning,
                        setting: str | ClassifierSettings, seed: int, *, preselected: bool = False
                        ) -> ClassifierResult:
    """Train a classifier to separate reference from generated showers and score it.

    Args:
        kind: input kind, one of "low", "low_normed", "high" (see :func:`classifier_inputs`).
        reference: (incident_energies (N,), showers (N, V)) in MeV, thresholded.
        generated: the same for generated showers.
        binning: geometry of both samples.
        setting: "full" (challenge protocol), "quick" or a :class:`ClassifierSettings`.
        seed: seeds the shuffles, the split, the weight initialisation and the batch
            order; the same seed gives the same numbers on the same machine.

    Both classes are shuffled and cut to the smaller size (the challenge requires
    equal sizes), and to ``max_showers_per_class`` when set (:func:`classifier_rows`).
    ``preselected=True``: ``reference`` and ``generated`` are those rows already, in
    that order (as read chunk by chunk from files); they are used as given.

    Returns:
        :class:`ClassifierResult` with AUC, JSD and the ROC curve on the validation
        split after isotonic calibration on the test split, and the 1-based epoch
        kept (best test accuracy).
    """
    settings = resolve_settings(setting, binning)
    if kind not in KINDS:
        raise ConfigError(f"unknown classifier input kind {kind!r}: use one of {', '.join(KINDS)}")
    ref_energies, ref_showers = check_showers(*reference, binning, "reference")
    gen_energies, gen_showers = check_showers(*generated, binning, "generated")

    if preselected:
        if len(ref_energies) != len(gen_energies):
            raise ConfigError(f"preselected classes must be equal: {len(ref_energies)} reference and "
                              f"{len(gen_energies)} generated showers")
        ref_keep = gen_keep = np.arange(len(ref_energies))
    else:
        ref_keep, gen_keep = classifier_rows(len(ref_energies), len(gen_energies), settings, seed)
    n_per_class = len(ref_keep)
    n_train, n_test, _ = split_sizes(n_per_class, settings)
    ref_inputs = classifier_inputs(kind, ref_energies[ref_keep], ref_showers[ref_keep], binning)
    gen_inputs = classifier_inputs(kind, gen_energies[gen_keep], gen_showers[gen_keep], binning)

    bounds = [slice(0, n_train), slice(n_train, n_train + n_test), slice(n_train + n_test, n_per_class)]
    splits = []
    for part in bounds:
        inputs = np.concatenate([ref_inputs[part], gen_inputs[part]])
        labels = np.concatenate([np.ones(part.stop - part.start), np.zeros(part.stop - part.start)])
        splits.append((inputs, labels))
    del ref_inputs, gen_inputs

    device = _resolve_device(settings.device)
    dtype = torch.float64 if settings.dtype == "float64" else torch.float32
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(previous_threads, settings.max_threads)))
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        # A private RNG state: seeding does not disturb the caller's torch RNG.
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            return _train_and_score(kind, settings, splits, device, dtype, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _train_and_score(kind: str, settings: ClassifierSettings, splits: list[tuple[np.ndarray, np.ndarray]],
                     device: torch.device, dtype: torch.dtype, seed: int) -> ClassifierResult:
    (train_x, train_y), (test_x, test_y), (val_x, val_y) = splits
    train_inputs = torch.as_tensor(train_x, dtype=dtype, device=device)
    train_labels = torch.as_tensor(train_y, dtype=dtype, device=device)
    test_inputs = torch.as_tensor(test_x, dtype=dtype, device=device)
    val_inputs = torch.as_tensor(val_x, dtype=dtype, device=device)

    model = build_classifier(train_inputs.shape[1], settings.hidden_layers).to(device=device, dtype=dtype)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    loss_function = torch.nn.BCEWithLogitsLoss()
    order_generator = torch.Generator().manual_seed(seed)

    best_accuracy, best_epoch, best_state = -math.inf, -1, None
    with ProgressBar(settings.max_epochs, desc=f"classifier {kind} ({settings.name})", unit="epoch") as bar:
        for epoch in range(settings.max_epochs):
            model.train()
            order = torch.randperm(len(train_inputs), generator=order_generator).to(device)
            for start in range(0, len(order), settings.batch_size):
                batch = order[start:start + settings.batch_size]
                loss = loss_function(model(train_inputs[batch]).reshape(-1), train_labels[batch])
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"classifier loss became {loss.item()} in epoch {epoch + 1}; "
                                                "check the inputs for extreme values or lower the learning rate")
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            accuracy = _accuracy(test_y, _probabilities(model, test_inputs, settings.batch_size))
            if accuracy > best_accuracy:
                best_accuracy, best_epoch = accuracy, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
            bar.update()
            bar.set_postfix(test_accuracy=f"{accuracy:.4f}", best_epoch=best_epoch)
            if accuracy == 1.0:
                break

    model.load_state_dict(best_state)
    calibrated = calibrate_probabilities(_probabilities(model, test_inputs, settings.batch_size), test_y,
                                         _probabilities(model, val_inputs, settings.batch_size))
    fpr, tpr, _ = roc_curve(val_y, calibrated)
    return ClassifierResult(kind=kind, auc=float(roc_auc_score(val_y, calibrated)),
                            jsd=jensen_shannon_divergence(val_y, calibrated), setting=settings.name,
                            fpr=fpr, tpr=tpr, best_epoch=best_epoch)
