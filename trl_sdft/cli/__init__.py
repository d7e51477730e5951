"""The process side of trl-sdft: what a command line adds to the library (`import trl_sdft` never imports it).

- `sdft`: the `trl-sdft` command and `python scripts/sdft.py` (`main`, TRL's parser over `SDFTConfig`, `ModelConfig`
  and the script arguments; `trl-sdft vllm-serve`, `trl-sdft continual`).
- `continual`: `trl-sdft continual` and `python scripts/continual.py` over the harness in `trl_sdft/continual/`.
- `offline`: `python scripts/extract_logits.py` and `python scripts/distill_sft.py` over `trl_sdft/offline/`.
- `yaml_config`: `--config FILE` read and checked line by line before any model loads.
- `data_files`: `--dataset_path` files (JSON, JSONL, Parquet, CSV, `save_to_disk`) read with file and row in errors.
- `output_dir`: the output directory claimed with a lock; nothing a user has is overwritten without a flag.
- `launch`: one command, several CPU processes (torchrun), and a teardown of the process group that never hangs.
- `callables`: `module:function` names from flags (`--tools`, `--environment_factory`).

The command's functions are importable from here as before (`trl_sdft.cli.main`, `trl_sdft.cli.build_parser`, ...);
they are loaded on first use, so that the other commands (`trl_sdft.cli.offline`, `trl_sdft.cli.continual`) use the
modules above without loading TRL's parser. Nothing else in the package imports this folder.
"""

COMMAND = (
    "ARGUMENT_CLASSES",
    "SDFTScriptArguments",
    "build_parser",
    "load_data",
    "main",
    "parse",
    "print_summary",
    "train",
    "vllm_serve_command",
    "vllm_serve_parser",
)


def __getattr__(name: str):
    if name in COMMAND:
        from . import sdft

        return getattr(sdft, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(COMMAND)
