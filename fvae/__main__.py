"""fvae's commands, one per job:

    python -m fvae train   --config sharp_bce --workdir runs/sharp_bce   (= fvae-train)
    python -m fvae sweep   --config study:cpu --sweep_dir runs/study     (= fvae-sweep)
    python -m fvae compare runs/sharp_bce runs/mse_dh32 --out cmp.png   (= fvae-compare)
    python -m fvae results docs/results/study                           (= fvae-results)
    python -m fvae bench   --models conv --batch-sizes 128              (= fvae-bench)
    python -m fvae list    the experiment and sweep configs fvae ships

`python -m fvae COMMAND --help` shows a command's flags and examples.
"""

import sys

COMMANDS = {  # name -> (module, function): imported only when run
    "train": ("fvae.launch", "run"),
    "sweep": ("fvae.sweep", "main"),
    "compare": ("fvae.compare", "main"),
    "results": ("fvae.results", "main"),
    "bench": ("fvae.bench.training", "main"),
}


def list_configs() -> None:
    from fvae import configs
    for name, path in configs.packaged_experiments().items():
        kind = "sweep" if "axes" in configs.load_config_file(path) else "experiment"
        print(f"{name:16s} {kind:10s} {path}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        return print(__doc__)
    command = argv[1]
    if command == "list":
        return list_configs()
    if command not in COMMANDS:
        sys.exit(f"fvae: unknown command {command!r}; expected one of "
                 f"{', '.join([*COMMANDS, 'list'])} (python -m fvae --help)")
    module, function = COMMANDS[command]
    sys.argv = [f"fvae {command}", *argv[2:]]  # (what each command parses)
    getattr(__import__(module, fromlist=[function]), function)()


if __name__ == "__main__":
    main()
