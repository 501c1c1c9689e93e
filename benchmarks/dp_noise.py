"""Print the noise a DP run needs at each epsilon: one-shot noise (the class means' and the other releases'), the
label-name threshold, the DP-SGD noise multiplier.

    python benchmarks/dp_noise.py [--cells 300 2000 20000] [--counts] [--rounds 30 --vae-steps 100 --scdg-steps 50]
    python benchmarks/dp_noise.py --statistics [--counts]   (dp-pretraining=statistics, the DP default: no DP-SGD)

Pure accounting (no data): the numbers the README's privacy section quotes.
"""

from __future__ import annotations

import argparse

from server.config import FederationConfig
from shared.errors import ConfigError
from shared.privacy.accounting import PRIMARY, epsilon, site_calibration
from shared.privacy.mechanisms import name_threshold
from shared.privacy.spec import DPSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # first paragraph: argparse rewraps it
    ap.add_argument("--cells", type=int, nargs="+", default=[300, 2000, 20000], help="training cells at a site")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--vae-steps", type=int, default=100)
    ap.add_argument("--scdg-steps", type=int, default=50)
    ap.add_argument(
        "--counts", action="store_true", help="count input (with DP-SGD, one more release: library statistics)"
    )
    ap.add_argument(
        "--statistics", action="store_true", help="dp-pretraining=statistics: class means released, no DP-SGD rounds"
    )
    args = ap.parse_args()

    def spec_at(eps: float) -> DPSpec:  # the DP plan the coordinator sends (server.config), not a copy of it
        return FederationConfig.from_run_config(
            {
                "dp-epsilon": eps,
                "dp-pretraining": "statistics" if args.statistics else "dp-sgd",
                "num-pretrain-rounds": args.rounds,
                "vae-local-steps": args.vae_steps,
                "scdg-local-steps": args.scdg_steps,
            }
        ).dp_spec("table")

    first = spec_at(args.epsilons[0])
    print(
        f"schedule: {first.rounds} DP-SGD rounds x {first.vae_steps} VAE steps (batch {first.vae_batch}) + "
        f"{first.scdg_steps} SCDG steps (batch {first.scdg_batch}); count input: {args.counts}; class means: "
        f"{first.class_means}; library statistics released: {args.counts and first.library_stats}"
    )
    print(
        "| cells | epsilon | delta | one-shot noise: class means | other one-shot releases | label threshold (cells) "
        "| DP-SGD noise | epsilon spent |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in args.cells:
        for eps in args.epsilons:
            spec = spec_at(eps)
            sched, delta = spec.schedule(n, has_counts=args.counts), spec.site_delta(n)
            try:
                sched, noise = site_calibration(eps, delta, sched)  # the class means spend what the rest left
            except ConfigError:
                print(f"| {n} | {eps:g} | {delta:.1e} | - | - | - | unreachable | - |")
                continue
            main_noise = f"{noise.stats * sched.scale(PRIMARY):.2f}" if PRIMARY in sched.one_shot else "-"
            other = noise.stats * sched.scale("label counts")
            tau = name_threshold(other, spec.names_delta())
            print(
                f"| {n} | {eps:g} | {delta:.1e} | {main_noise} | {other:.2f} | {tau:.0f} | {noise.sgd:.2f} "
                f"| {epsilon(sched, noise, delta):.3f} |"
            )


if __name__ == "__main__":
    main()
