"""The ``oarbench`` command line: a click group of thin commands.

Each command lives in its own module under :mod:`oarbench.cli` and is imported
only when it is run (or when ``--help`` lists it), so ``oarbench evaluate``
never pays for torch, nnU-Net or matplotlib.
"""

from __future__ import annotations

import importlib

import click

from oarbench import __version__

# command name -> "module:attribute" (module relative to oarbench.cli)
_COMMANDS: dict[str, str] = {
    "evaluate": "evaluate_cmd:evaluate",
    "phantoms": "phantoms_cmd:phantoms",
    "demo": "demo_cmd:demo",
    "robustness": "robustness_cmd:robustness",
    "absent": "absent_cmd:absent",
    "stats": "stats_cmd:stats",
    "gallery": "report_cmd:gallery",
    "report": "report_cmd:report",
    "train": "train_cmd:train",
    "fl": "train_cmd:fl",
    "dicom": "dicom_cmd:dicom",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(f"oarbench.cli.{module_name}")
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command with its whole first sentence, wrapped (click would cut it at the line's end)."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="oarbench")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Benchmark CT organ-at-risk auto-contouring models (local vs federated)."""
    from oarbench.cli._common import one_line_warnings, stop_children_on_sigterm

    ctx.with_resource(one_line_warnings())
    ctx.with_resource(stop_children_on_sigterm())
