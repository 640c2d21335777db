"""`--tool-parser-plugin FILE`: a Python file run once at start-up that registers parsers.

    from engine.output_parsing import register_tool_parser
    from engine.output_parsing.tool_parsers import ParsedCall, ToolParser

    @register_tool_parser("my_format")
    class MyFormatParser(ToolParser):
        markers = ("<call>",)          # where a tool-call region starts
        only_at_start = False          # True: only when the output starts with a marker

        def parse(self, region, final):
            # the calls complete at the start of `region` and how many characters they used
            ...
            return [ParsedCall(name, json_arguments)], used

The file runs in the engine's serving process with the server's rights: it is the
operator's code, named on the command line, like the model path.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_tool_parser_plugin(path: str) -> None:
    """Run the plugin file (its `register_tool_parser` calls fill TOOL_PARSERS). Raises
    ValueError naming --tool-parser-plugin when the file is missing or fails."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--tool-parser-plugin: no such file {path!r}")
    name = f"protoserve_tool_parser_plugin_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"--tool-parser-plugin: {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ValueError(f"--tool-parser-plugin {path!r} failed to load: {error!r}") from error
