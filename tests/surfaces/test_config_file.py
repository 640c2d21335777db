"""`engine-serve --config FILE`: every long flag is a key; command line > file > defaults."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from engine_process import REPO_ROOT, start_engine

from protoserve.cli.serve import build_parser
from protoserve.cli.config_file import ConfigFileError, long_options, parse_args_with_config


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _parse(*argv: str):
    return parse_args_with_config(build_parser(), list(argv))


def test_file_values_apply_and_command_line_wins(tmp_path: Path) -> None:
    path = _write(tmp_path, "max_num_seqs: 7\nblock-size: 32\nkv-cache-memory: 64MiB\n")
    args = _parse("--config", path, "--max-num-seqs", "9")
    assert args.max_num_seqs == 9  # command line over file
    assert args.block_size == 32  # file over default
    assert args.kv_cache_memory == 64 * 2**20  # converted with the option's own type
    assert args.max_num_batched_tokens == 2048  # default when neither says


def test_equals_form_and_order_do_not_matter(tmp_path: Path) -> None:
    path = _write(tmp_path, "max-num-seqs: 7\n")
    assert _parse(f"--config={path}").max_num_seqs == 7
    assert _parse("--max-num-seqs", "3", f"--config={path}").max_num_seqs == 3


def test_booleans_switch_off_in_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "enable-prefix-caching: false\ngrpc_auth_exempt_health: false\n"
                  "disable-fastapi-docs: true\nallow-credentials: false\n")
    args = _parse("--config", path)
    assert args.enable_prefix_caching is False  # BooleanOptionalAction default True
    assert args.grpc_auth_exempt_health is False
    assert args.disable_fastapi_docs is True  # store_true switched on
    assert args.allow_credentials is False
    # ... and the command line still wins over the file.
    assert _parse("--config", path, "--enable-prefix-caching").enable_prefix_caching is True
    off = _write(tmp_path, "disable-fastapi-docs: false\n", "off.yaml")
    assert _parse("--config", off).disable_fastapi_docs is False


def test_lists_take_yaml_lists(tmp_path: Path) -> None:
    path = _write(tmp_path, "served-model-name: [first, second]\n"
                  "allowed-origins:\n  - http://a.example\n  - http://b.example\n")
    args = _parse("--config", path)
    assert args.served_model_name == ["first", "second"]
    assert args.allowed_origins == ["http://a.example", "http://b.example"]
    single = _write(tmp_path, "served-model-name: only\n", "single.yaml")
    assert _parse("--config", single).served_model_name == ["only"]
    assert _parse("--config", path, "--served-model-name", "cli").served_model_name == ["cli"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("max-num-seq: 4\n", "unknown key 'max-num-seq'"),
        ("max-num-seqs: lots\n", "key 'max-num-seqs'"),
        ("max-num-seqs: true\n", "key 'max-num-seqs'"),
        ("enable-prefix-caching: 3\n", "key 'enable-prefix-caching'"),
        ("dtype: float16\n", "key 'dtype': invalid choice"),
        ("- a list\n", "expected a mapping"),
        ("config: other.yaml\n", "unknown key 'config'"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigFileError, match=fragment):
        _parse("--config", path)


def test_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "max-num-seqs: 4\nno-such-option: 1\n")
    result = subprocess.run([sys.executable, "-m", "protoserve.cli.serve", "--config", path],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-option" in lines[0], result.stderr


def _example_module():
    spec = importlib.util.spec_from_file_location(
        "gen_example_config", REPO_ROOT / "scripts" / "gen_example_config.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_example_config_is_up_to_date_and_documents_every_flag(tmp_path: Path) -> None:
    gen = _example_module()
    committed = (REPO_ROOT / "examples" / "config.yaml").read_text(encoding="utf-8")
    assert committed == gen.render(build_parser()), (
        "examples/config.yaml is stale: run python scripts/gen_example_config.py")
    documented = {key for key, action in long_options(build_parser()).items()
                  if action.help != "==SUPPRESS==" and key != "config"
                  and not key.startswith("no-")}
    for key in documented:
        assert f"\n# {key}: " in committed, key
    # Uncommented, the example is a valid file that changes nothing.
    active = "\n".join(line[2:] if any(line.startswith(f"# {k}: ") for k in documented)
                       else line for line in committed.splitlines())
    path = _write(tmp_path, active)
    assert vars(_parse("--config", path)) == {**vars(_parse()), "config": path}


def test_running_server_uses_file_and_command_line(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, "served_model_name:\n  - from-file\n  - file-alias\n"
                  "max-model-len: 128\nenable-prefix-caching: false\n")
    server = start_engine(tiny_llama_dir, f"--config={path}", "--max-model-len", "256",
                          role="all")
    try:
        client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused",
                               max_retries=0, timeout=60)
        cards = client.models.list().data
        assert [card.id for card in cards] == ["from-file", "file-alias"]
        assert cards[0].to_dict()["max_model_len"] == 256
    finally:
        server.stop()
