"""The template service from Python: enroll a person, verify and identify a probe, delete.

    advface keys create acme            # prints an API key
    advface serve &                     # http://127.0.0.1:8000
    ADVFACE_API_KEY=afk_... python examples/service_client.py alice a1.jpg a2.jpg probe.jpg

The faces are aligned and E runs here, on the client; only feature maps are uploaded, and the
service stores them protected.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from advface.service.sdk import AdvFaceClient


def main(argv: list[str] | None = None, client: AdvFaceClient | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("subject", help="the person's id in your system")
    ap.add_argument("enroll", nargs="+", type=Path, help="enrollment images, then the probe")
    ap.add_argument("--url", default=os.environ.get("ADVFACE_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--keep", action="store_true", help="do not delete the subject at the end")
    args = ap.parse_args(argv)
    if len(args.enroll) < 2:
        ap.error("give at least one enrollment image and a probe")
    *images, probe = args.enroll
    c = client or AdvFaceClient(args.url, os.environ.get("ADVFACE_API_KEY", ""))
    with c:
        c.wait_ready(timeout=120)  # the service embeds and indexes its templates at start-up
        c.create_subject(args.subject, exist_ok=True)
        templates = [c.enroll(args.subject, image) for image in images]
        verdict = c.verify(args.subject, probe)
        candidates = c.identify(probe, top_k=3)
        print(f"enrolled {len(templates)} templates ({templates[0].protection})")
        print(f"verify {args.subject}: match={verdict.match} score={verdict.score:.3f}")
        print("identify:", ", ".join(f"{x.subject_id} {x.score:.3f}" for x in candidates))
        deleted = 0 if args.keep else c.delete_subject(args.subject)
    return {
        "templates": len(templates),
        "match": verdict.match,
        "top": candidates[0].subject_id if candidates else None,
        "deleted": deleted,
    }


if __name__ == "__main__":
    main()
