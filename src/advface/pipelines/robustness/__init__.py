"""The robustness bench: every protection against every attacker, beside the floors.

``run_bench(profile, out)`` trains the server's models (shadow S, generator D on CelebA's
server half) and the attackers (LFW people outside the test folds: checked by identity name;
every attacker on the same images and settings), then measures reconstruction (SSIM / PSNR /
MSE with 95% CIs), replay (SRRA at the operating threshold and, with at least 1,000 impostor
pairs, at FAR = 1e-3, beside chance; the replay cosine) and verification accuracy (Wilson 95%
interval over pairs) for none, random, dp, advface and embedding-shadow. The report gives,
per method and metric, the strongest attacker against the embedding-only floor. Outputs:
``results.json`` (rows with ``table: "robustness"``; the code's git commit in its meta),
``robustness.csv``, ``report.md``, a privacy-vs-accuracy frontier and an image grid.
"""

from advface.pipelines.robustness.profiles import PROFILES, BenchProfile, get_profile
from advface.pipelines.robustness.run import run_bench

__all__ = ["PROFILES", "BenchProfile", "get_profile", "run_bench"]
