"""Entry point for device calls: the device has PyTorch, OpenCV, safetensors, tqdm, matplotlib,
scikit-image and torchmetrics but not this project's CLI stack, so this uses argparse and calls
the library directly (see docs/DEVICE.md)."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="device_main")
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check stage parts against the manifest")
    v.add_argument("stage")
    v.add_argument("parts", nargs="*")
    u = sub.add_parser("unstage", help="write the staged data root")
    u.add_argument("stage")
    u.add_argument("--root", required=True)
    r = sub.add_parser("reproduce", help="advface reproduce on the staged data root")
    r.add_argument("--profile", default="paper")
    r.add_argument("--device", default="cuda")
    r.add_argument("--data-root", required=True)
    r.add_argument("--weights", required=True)
    r.add_argument("--out", required=True)
    b = sub.add_parser("bench", help="the robustness bench on the staged data root")
    b.add_argument("--profile", default="gpu")
    b.add_argument("--device", default="cuda")
    b.add_argument("--dataset", action="append", help="lfw / cfp-fp (repeat)")
    b.add_argument("--data-root", required=True)
    b.add_argument("--weights", required=True)
    b.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from advface.pipelines import staging

    if args.cmd == "verify":
        manifest = staging.verify(args.stage, args.parts or None)
        print(f"ok: {', '.join(args.parts) or 'all parts'} of {len(manifest['parts'])}")
    elif args.cmd == "unstage":
        print(staging.unstage(args.stage, args.root))
    elif args.cmd == "bench":
        from advface.pipelines.robustness import get_profile, run_bench
        from advface.pipelines.robustness.report import summary

        overrides = {"datasets": tuple(args.dataset)} if args.dataset else {}
        res = run_bench(
            get_profile(args.profile, **overrides),
            args.out,
            data_root=args.data_root,
            device=args.device,
            weights=args.weights,
        )
        print(summary(res["rows"]))
        print(json.dumps({"wall_s": res["wall_s"], "device": res["device"]}))
    else:
        from advface.pipelines.reproduce.headline import headline_table
        from advface.pipelines.reproduce.profiles import get_profile
        from advface.pipelines.reproduce.run import reproduce

        res = reproduce(
            get_profile(args.profile),
            args.out,
            data_root=args.data_root,
            device=args.device,
            weights=args.weights,
        )
        print(headline_table(res["rows"]))
        print(json.dumps({"wall_s": res["wall_s"], "device": res["device"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
