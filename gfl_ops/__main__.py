"""python -m gfl_ops <command>: `bench` runs the benchmark, `verify` checks the gradients of
every available backend on this device, `tune` writes the table backend="auto" reads from
bench results (python -m gfl_ops <command> --help)."""

import sys

COMMANDS = {
    "bench": "compare gfl_ops with the eager reference, torch.compile and mmdetection-style eager",
    "verify": "gradcheck and low-precision parity of every available backend on this device",
    "tune": "the tuning table of backend='auto' (native or triton, the gradient pass) from bench results",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: python -m gfl_ops <command> [options]\n\ncommands:\n" + "".join(
            f"  {name:8s}{text}\n" for name, text in COMMANDS.items()
        )
        known = not argv or argv[0] in ("-h", "--help")
        print(usage if known else f"unknown command {argv[0]!r}\n\n{usage}", file=sys.stdout if known else sys.stderr)
        return 0 if known else 2
    if argv[0] == "verify":
        from . import verify

        return verify.main(argv[1:])
    if argv[0] == "tune":
        from . import tune

        return tune.main(argv[1:])
    from . import bench

    return bench.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
