"""``hookmoe frontier``: every allocator x compensator and the dynamic rules at each target Act; table + plot.

Options: :class:`hookmoe.search.frontier.FrontierOptions` (the flags are generated from it)."""

from __future__ import annotations

import sys

from hookmoe.errors import FrontierError
from hookmoe.search.frontier import FrontierOptions, FrontierSettings, frontier, frontier_markdown, parse_acts, \
    write_frontier


def frontier_cmd(o: FrontierOptions) -> None:
    """Quality vs Act: every allocator x compensator and the dynamic rules at each target Act."""
    from hookmoe.cli.common import console
    from hookmoe.data import make_blocks
    from hookmoe.hook import load

    sens = o.read_sensitivity()
    mm = load(o.model, seed=o.seed, **o.load_kwargs())
    acts = parse_acts(o.acts, mm)
    if mm.tokenizer is None:
        raise FrontierError("this model has no tokenizer, so --calib/--data text cannot be tokenised")
    _, comps, _ = o.names()
    cb = make_blocks(mm.tokenizer, o.calib, o.n_calib + (o.n_train if comps != ["none"] else 0), o.block_len,
                     seed=o.seed, split="train", progress=True)
    calib_blocks, train_blocks = cb[:o.n_calib], (cb[o.n_calib:] if cb.shape[0] > o.n_calib else cb[:o.n_calib])
    eval_blocks = make_blocks(mm.tokenizer, o.data, o.n_eval, o.block_len, seed=o.seed, split="heldout",
                              progress=True)
    mc_items = None
    if o.mc:
        from hookmoe.eval import load_mc_source

        mc_items = load_mc_source(o.mc, seed=o.seed)
    res = frontier(mm, calib_blocks=calib_blocks, eval_blocks=eval_blocks, acts=acts, train_blocks=train_blocks,
                   mc_items=mc_items, sensitivity=sens, console=console, **o.pick(FrontierSettings))
    res["command"] = "hookmoe " + " ".join(sys.argv[1:]) if sys.argv else None
    res["model"], res["calib"], res["data"] = o.model, o.calib, o.data
    paths = write_frontier(res, o.out, title=f"{o.model}: quality vs Act")
    print(frontier_markdown(res))
    console.print(f"wrote {paths['md']}, {paths['json']}, {paths['png']} ({res['time_s']:.1f} s)")


def register_cli(app) -> None:
    from hookmoe.cli.options import options_command

    options_command(app, "frontier", FrontierOptions)(frontier_cmd)
