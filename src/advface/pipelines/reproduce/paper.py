"""The paper's reported figures (Wang et al., CVPR 2023, Tables 1-4), for side-by-side reports.

Accuracy and SRRA are fractions in [0, 1]. AgeDB-30 has no offline copy here, so it is listed
for completeness and reported as "no offline copy".
"""

from __future__ import annotations

DATASETS = ("lfw", "cfp-fp", "agedb-30")

# Table 1: (ssim, psnr, mse, srra) per method and dataset; ResRec attacker, ResRec shadow.
TABLE1: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "none": {
        "lfw": (0.93, 27.87, 0.002, 0.9740),
        "cfp-fp": (0.83, 22.89, 0.006, 0.8971),
        "agedb-30": (0.87, 23.96, 0.005, 0.8453),
    },
    "random": {
        "lfw": (0.90, 22.81, 0.005, 0.9473),
        "cfp-fp": (0.79, 20.73, 0.009, 0.8726),
        "agedb-30": (0.86, 21.68, 0.007, 0.7747),
    },
    "dp": {
        "lfw": (0.90, 23.12, 0.005, 0.9397),
        "cfp-fp": (0.79, 20.89, 0.009, 0.8494),
        "agedb-30": (0.86, 21.86, 0.007, 0.7807),
    },
    "advface": {
        "lfw": (0.28, 6.97, 0.206, 0.0403),
        "cfp-fp": (0.23, 5.98, 0.261, 0.1843),
        "agedb-30": (0.24, 5.85, 0.269, 0.1667),
    },
}

# Table 2: verification accuracy (online mode for AdvFace).
TABLE2: dict[str, dict[str, float]] = {
    "none": {"lfw": 0.9813, "cfp-fp": 0.9316, "agedb-30": 0.8757},
    "random": {"lfw": 0.9720, "cfp-fp": 0.9167, "agedb-30": 0.8660},
    "dp": {"lfw": 0.9627, "cfp-fp": 0.9084, "agedb-30": 0.8512},
    "advface": {"lfw": 0.9643, "cfp-fp": 0.9059, "agedb-30": 0.8510},
}

# Table 2, "Ours (offline)": Psi retrained on AdvFace's protected features.
TABLE2_OFFLINE: dict[str, dict[str, float]] = {
    "advface": {"lfw": 0.9778, "cfp-fp": 0.9204, "agedb-30": 0.8635},
}

# Table 3: accuracy of AdvFace per shadow architecture.
TABLE3: dict[str, dict[str, float]] = {
    "transrec": {"lfw": 0.9653, "cfp-fp": 0.9077, "agedb-30": 0.8513},
    "resrec": {"lfw": 0.9643, "cfp-fp": 0.9059, "agedb-30": 0.8510},
    "urec": {"lfw": 0.9642, "cfp-fp": 0.9013, "agedb-30": 0.8458},
}

# Table 4: (ssim, psnr) per shadow x attacker architecture and dataset.
TABLE4: dict[tuple[str, str], dict[str, tuple[float, float]]] = {
    ("transrec", "transrec"): {
        "lfw": (0.20, 6.93),
        "cfp-fp": (0.16, 7.40),
        "agedb-30": (0.19, 5.92),
    },
    ("transrec", "resrec"): {"lfw": (0.27, 6.84), "cfp-fp": (0.20, 5.96), "agedb-30": (0.23, 5.59)},
    ("transrec", "urec"): {"lfw": (0.26, 7.33), "cfp-fp": (0.20, 6.81), "agedb-30": (0.22, 6.14)},
    ("resrec", "transrec"): {"lfw": (0.23, 6.90), "cfp-fp": (0.19, 7.01), "agedb-30": (0.21, 5.92)},
    ("resrec", "resrec"): {"lfw": (0.28, 6.97), "cfp-fp": (0.23, 5.98), "agedb-30": (0.24, 5.85)},
    ("resrec", "urec"): {"lfw": (0.29, 7.47), "cfp-fp": (0.24, 6.70), "agedb-30": (0.24, 6.20)},
    ("urec", "transrec"): {"lfw": (0.24, 6.73), "cfp-fp": (0.20, 7.36), "agedb-30": (0.23, 5.88)},
    ("urec", "resrec"): {"lfw": (0.27, 6.57), "cfp-fp": (0.21, 6.17), "agedb-30": (0.23, 5.48)},
    ("urec", "urec"): {"lfw": (0.28, 7.01), "cfp-fp": (0.23, 6.94), "agedb-30": (0.23, 5.95)},
}

# Tolerances for flagging a deviation in the report (absolute differences).
TOLERANCE = {"ssim": 0.05, "psnr": 2.0, "mse": 0.02, "srra": 0.05, "accuracy": 0.01}
