"""The robustness bench: every protection against every attacker, beside the floors.

``run_bench(profile, out)`` trains the server's models (shadow S, generator D on CelebA's
server half) and the attackers (LFW people outside the test folds: checked by identity name),
then measures reconstruction (SSIM / PSNR / MSE with 95% CIs), replay (SRRA at the operating
threshold and at FAR = 1e-3, beside chance) and verification accuracy for none, random, dp,
advface and embedding-shadow. Outputs: ``results.json`` (rows with ``table: "robustness"``),
``robustness.csv``, ``report.md``, a privacy-vs-accuracy frontier and an image grid.
"""

from advface.pipelines.robustness.profiles import PROFILES, BenchProfile, get_profile
from advface.pipelines.robustness.run import run_bench

__all__ = ["PROFILES", "BenchProfile", "get_profile", "run_bench"]
