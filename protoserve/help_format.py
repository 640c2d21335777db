"""`--help` that shows every option's default, for engine-serve and engine-bridge alike."""
from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to each option's help, unless the help already says what the
    default is (a None default usually means something, such as "the model's": the help text
    says what). The module docstring used as description keeps its own line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default is argparse.SUPPRESS
                or action.required or not action.option_strings):
            return text
        if action.default is None:
            return f"{text} (default: none)"
        return text + " (default: %(default)s)"
