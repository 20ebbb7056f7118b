"""`emixer audit`: a site's privacy officer attacks a trained model with the site's own studies."""

from __future__ import annotations

import argparse
from pathlib import Path

from emixer_cli.common import CommandError, console, state_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="membership-inference and memorisation audit of a model on this site's data",
        description="Attack a trained model with this site's own studies: does the "
        "discriminator, the report loss, or the distance to generated images tell the studies it "
        "was trained on from the held-out ones (ROC AUC, TPR at 1% and 0.1% FPR, bootstrap 95% "
        "CIs)? And are synthetic images closer to real ones than real images are to each other? "
        "The model must be trained with train.holdout_fraction > 0. Writes OUT/audit.json and "
        "a PNG of the closest synthetic-real pairs; they contain real images and study details, "
        "so they stay at the site.",
    )
    parser.add_argument(
        "--model", required=True, help="checkpoint file (checkpoints/round-NNNN.pt)"
    )
    parser.add_argument("--site", required=True, help="this site's folder (studies.csv + DICOM)")
    parser.add_argument(
        "--state-dir",
        help="where the site's decoded-image cache lives (default ~/.emixer/state/<site>-<hash>)",
    )
    parser.add_argument(
        "--out", help="folder for audit.json and the PNG (default STATE_DIR/audit; keep at site)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generation and bootstrap seed (0)")
    parser.add_argument(
        "--per-label",
        type=int,
        default=64,
        help="generated images per label set for the nearest-neighbour attack (64)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`emixer audit`: load checkpoint and site, refuse models trained without a holdout."""
    from emixer_model.config import FINDINGS, ConfigError, EmixerConfig, from_dict
    from emixer_model.data.site import load_site
    from emixer_model.data.splits import load_split
    from emixer_model.membership_audit import (
        PNG_NAME,
        STAYS_AT_SITE,
        audit_table,
        run_audit,
        unresolved_note,
    )
    from emixer_model.networks import build_networks, pick_device, set_weights
    from emixer_model.text.vocabulary import VOCAB_SIZE
    from server.checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(args.model))
    try:
        cfg = from_dict(EmixerConfig, ckpt.config)
    except ConfigError as err:
        raise CommandError(f"the config stored in {args.model} is not usable: {err}") from None
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    try:
        set_weights(nets, ckpt.arrays)
        device = pick_device(cfg.train.device)
    except ValueError as err:
        raise CommandError(f"{args.model}: {err}") from None
    nets.to(device)
    site_dir = Path(args.site)
    site_state = state_dir(args, site_dir)
    out_dir = Path(args.out) if args.out else site_state / "audit"
    holdout = load_split(site_state)
    if holdout is None:
        raise CommandError(
            f"{site_state} records no evaluation split, so no study of this site is known to be "
            "a non-member; a membership audit needs a model trained with train.holdout_fraction "
            "> 0 (e.g. 0.2) from this state dir, which records the held-out patients before "
            "round 1 (pass the state dir training used with --state-dir)"
        )
    console.print(f"[dim]loading {site_dir} ...[/dim]")
    data = load_site(site_dir, site_state, cfg.model, uncertain_as=cfg.train.uncertain_as)
    console.print(f"[dim]attacking {len(data.images)} labeled studies ...[/dim]")
    result = run_audit(
        nets,
        data,
        holdout,
        cfg.model.latent_dim,
        out_dir,
        seed=args.seed,
        per_label=args.per_label,
    )
    console.print(audit_table(result))
    note = unresolved_note(result["attacks"])
    if note:
        console.print(note)
    memo = result["memorisation"]
    console.print(
        f"memorisation: {memo['fraction_closer_than_real_p1']:.1%} of "
        f"{memo['synthetic_images']} synthetic images are closer to a member image than the 1st "
        f"percentile of member-to-member distances ({memo['real_to_real_p1']:.3f})"
    )
    console.print(f"wrote {out_dir / 'audit.json'} and {out_dir / PNG_NAME}")
    console.print(f"[yellow]{STAYS_AT_SITE}[/yellow]")
    return 0
