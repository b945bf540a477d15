"""CLI errors are one clean line and exit code 2, never a traceback."""

from __future__ import annotations

import sys

import pytest
import torch
from typer.testing import CliRunner

from cacheblend_rag.cli import app, main

runner = CliRunner()


def check_one_line_error(output: str, message: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], output
    assert "Traceback" not in output and "╭" not in output, output


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: CUDA is not available here; use --device cpu or --device auto",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        (["--device", "tpu"], "--device tpu is not a device name; use auto, cpu, cuda or cuda:N"),
        (["--dtype", "int4"], "--dtype int4 is not supported; use auto, float32, bfloat16 or float16"),
        (["--model", "/no/such/model"], "could not load the model '/no/such/model': no model file or folder at"),
        (["--ratio", "nan"], "--ratio must be a number in [0, 1], got nan"),
        (["--ratio", "1.5"], "--ratio must be a number in [0, 1], got 1.5"),
    ],
)
def test_demo_option_errors(args, message, tmp_path):
    out = runner.invoke(app, ["demo", "--no-rag", "--cache-dir", str(tmp_path), *args])
    assert out.exit_code == 2, out.output
    check_one_line_error(out.output, message)


def test_ask_ratio_nan_is_named(tmp_path):
    out = runner.invoke(app, ["ask", "How tall?", "--ratio", "nan", "--index-dir", str(tmp_path)])
    assert out.exit_code == 2
    check_one_line_error(out.output, "--ratio must be a number in [0, 1], got nan")


def test_ingest_with_a_missing_model(docs_dir, tmp_path):
    out = runner.invoke(
        app, ["ingest", str(docs_dir), "--model", str(tmp_path / "nothing"), "--cache-dir", str(tmp_path / "cache")]
    )
    assert out.exit_code == 2
    check_one_line_error(out.output, "could not load the model")


def test_main_turns_other_input_errors_into_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """An error raised deep inside a command (here BlendConfig's, for bench's unchecked --ratio) through the
    ``cacheblend`` entry point: one line, exit 2; the traceback only with CACHEBLEND_LOG=DEBUG."""
    data = tmp_path / "data.json"
    data.write_text('[{"question": "Q?", "answers": ["A"], "ctxs": [{"title": "", "text": "One passage here."}]}]')
    argv = [
        "cacheblend",
        "bench",
        "ttft",
        "--data",
        str(data),
        "--n",
        "1",
        "--model",
        str(tiny_dir),
        "--dtype",
        "float32",
        "--ratio",
        "2",
        "--out",
        str(tmp_path / "out.json"),
        "--cache-dir",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    check_one_line_error(capsys.readouterr().out, "recompute_ratio must be a number in [0, 1], got 2.0")
