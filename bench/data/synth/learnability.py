"""Is the synthetic signal learnable but not trivial? A pixel-level logistic-regression check.

For each main finding, draw a balanced set of frontal cases (half with the finding, half without
it, both with the profile's usual background of other findings), shrink them to a tiny image,
fit a logistic regression on one half and report the AUROC on the other. A linear model on
32x32 pixels (each image standardised) is a weak learner: the findings should be clearly above chance for it (the signal
is there) and clearly below 1.0 (anatomy, exposure and noise hide part of it), so that pretrained
encoders have room to differ.

    python -m bench.data.synth.learnability [--cases 1000] [--size 128] [--pixels 32] [--seed 0]
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bench.data.synth.case import FINDINGS
from bench.data.synth.generate import sample_case
from bench.data.synth.profiles import PROFILES, FindingProfile

log = logging.getLogger(__name__)

#: Name of each checked target -> the findings that make a case positive for it.
TARGETS: dict[str, tuple[str, ...]] = {
    "consolidation": ("consolidation",),
    "effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "cardiomegaly": ("cardiomegaly",),
    "edema": ("edema",),
    "atelectasis": ("atelectasis",),
    "nodule/mass": ("nodule", "mass"),
    "covid": ("covid",),
    "foreign_object": ("foreign_object",),
    "support_devices": ("support_devices",),
}
assert all(f in FINDINGS for fs in TARGETS.values() for f in fs)
#: Background profile per target: the dataset the finding is benchmarked on (its usual companions
#: and, for foreign objects, Object-CXR's 1-4 objects per positive image); MIMIC otherwise.
HOME_PROFILE: dict[str, str] = {"consolidation": "rsna", "pneumothorax": "siim", "foreign_object": "object_cxr"}

#: Inverse regularisation strength of the probe (features are standardised). Fixed, not tuned per
#: finding, so the numbers compare findings rather than hyper-parameter searches.
PROBE_C = 0.003


@dataclass(frozen=True)
class ProbeResult:
    target: str
    auroc: float
    n_train: int
    n_test: int


def shrink(image: np.ndarray, pixels: int) -> np.ndarray:
    """Area-average an 8-bit image to ``pixels`` x ``pixels`` and standardise it (zero mean, unit
    variance per image, the usual per-film intensity normalisation), so that the probe sees
    anatomy and lesions rather than each film's exposure."""
    small = np.asarray(Image.fromarray(image).resize((pixels, pixels), Image.BOX), dtype=np.float32)
    return (small - small.mean()) / (small.std() + 1e-6)


def balanced_set(target: str, n_cases: int, size: int, pixels: int, seed: int = 0,
                 profile: FindingProfile | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features [n, pixels**2] and labels [n] of ``n_cases`` frontal cases, alternating positive
    (one of the target's findings forced present) and negative (all of them forced absent), on
    ``profile`` (default: the target's :data:`HOME_PROFILE`)."""
    group = TARGETS[target]
    base = (profile or PROFILES[HOME_PROFILE.get(target, "mimic")]).frontal()
    negative = base.forcing(absent=group)
    features = np.empty((n_cases, pixels * pixels), dtype=np.float32)
    labels = np.zeros(n_cases, dtype=np.int64)
    for i in range(n_cases):
        rng = np.random.default_rng([seed, list(TARGETS).index(target), i])
        if i % 2 == 0:
            finding = group[(i // 2) % len(group)]
            profile_i = base.forcing(present=[finding], absent=[g for g in group if g != finding])
            labels[i] = 1
        else:
            profile_i = negative
        case = sample_case(rng, profile_i, size, size)
        features[i] = shrink(case.image, pixels).ravel()
    return features, labels


def probe_auroc(features: np.ndarray, labels: np.ndarray) -> float:
    """Fit on the even-indexed half, AUROC on the odd-indexed half (both balanced)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    train = np.zeros(len(labels), dtype=bool)
    train[(np.arange(len(labels)) // 2) % 2 == 0] = True  # pairs (pos, neg) alternate train / test
    scaler = StandardScaler().fit(features[train])
    model = LogisticRegression(C=PROBE_C, max_iter=2000)
    model.fit(scaler.transform(features[train]), labels[train])
    scores = model.decision_function(scaler.transform(features[~train]))
    return float(roc_auc_score(labels[~train], scores))


def run(targets: tuple[str, ...] = tuple(TARGETS), n_cases: int = 600, size: int = 128, pixels: int = 32,
        seed: int = 0) -> list[ProbeResult]:
    """AUROC of the pixel probe for each target."""
    results = []
    for target in targets:
        start = time.perf_counter()
        features, labels = balanced_set(target, n_cases, size, pixels, seed)
        auroc = probe_auroc(features, labels)
        n_train = int(((np.arange(n_cases) // 2) % 2 == 0).sum())
        results.append(ProbeResult(target, auroc, n_train, n_cases - n_train))
        log.info("%-16s AUROC %.3f (%.1f s)", target, auroc, time.perf_counter() - start)
    return results


def format_table(results: list[ProbeResult]) -> str:
    lines = [f"{'finding':<16} {'AUROC':>6} {'train':>6} {'test':>6}"]
    lines += [f"{r.target:<16} {r.auroc:6.3f} {r.n_train:6d} {r.n_test:6d}" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per finding (half positive)")
    parser.add_argument("--size", type=int, default=128, help="generated image side")
    parser.add_argument("--pixels", type=int, default=32, help="side of the probe's input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = run(tuple(args.targets), args.cases, args.size, args.pixels, args.seed)
    log.info("pixel logistic-regression probe: %d cases/finding at %dpx, shrunk to %dx%d\n%s",
             args.cases, args.size, args.pixels, args.pixels, format_table(results))


if __name__ == "__main__":
    main()
